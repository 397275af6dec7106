"""The stall statistic of bench rebalance: each switch step against its neighbouring steady steps; a one-off
spike on a noisy host does not make a position slow, a step that is slow in every round does."""

import pytest

from rnq_ep.bench.rebalance_stall import StepRecord, neighbour_ratios, stall_rows


def round_of(index: int, staged_s: tuple[float, float], spike_s: float = 0.0) -> list[StepRecord]:
    """steady, staged (layer 0 chunk 0), steady, switch (layer 0 chunk 1), steady; steady steps take 0.1 s."""
    return [
        StepRecord("steady", index, (-1, 0), 0.1 + spike_s, 0.0, 0),
        StepRecord("staged", index, (0, 0), 0.1, staged_s[0], 1000),
        StepRecord("steady", index, (-1, 1), 0.1, 0.0, 0),
        StepRecord("switch", index, (0, 1), 0.1, staged_s[1], 500),
        StepRecord("steady", index, (-1, 2), 0.1, 0.0, 0),
    ]


def test_a_step_is_divided_by_the_mean_of_its_steady_neighbours():
    records = round_of(0, (0.05, 0.0), spike_s=0.1)
    ratios = neighbour_ratios(records)
    assert ratios[1] == pytest.approx(0.15 / 0.15)  # neighbours 0.2 and 0.1
    assert ratios[3] == pytest.approx(1.0)
    assert ratios[0] == pytest.approx(2.0)  # a steady step against the next steady one


def test_a_one_off_spike_is_not_a_slow_position_but_a_recurring_stall_is():
    records = round_of(0, (0.2, 0.08)) + round_of(1, (0.0, 0.08)) + round_of(2, (0.0, 0.08))
    rows = {row.kind: row for row in stall_rows(records)}
    assert rows["staged"].ratio[1] == pytest.approx(1.0)  # median over rounds of (3.0, 1.0, 1.0)
    assert rows["staged"].ratio[2] == pytest.approx(3.0)  # the worst single step is still reported
    assert rows["switch"].ratio[1] == pytest.approx(1.8)
    assert rows["staged"].moved_mb == pytest.approx(0.001) and rows["switch"].steps == 3
    assert rows["switch"].added == pytest.approx((1.8, 1.8))  # 0.08 s of migration on 0.1 s steady steps
    assert rows["staged"].added == pytest.approx((1.0, 1.0))  # the position's median migration is 0


def test_a_round_without_steady_steps_is_refused():
    with pytest.raises(ValueError, match="no steady step"):
        neighbour_ratios([StepRecord("staged", 0, (0, 0), 0.1, 0.0, 0)])
