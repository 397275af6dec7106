"""metrics.score_plan: balancedness under shares / best split / LP, LIS, quantized tokens, bytes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from handmade_plans import plain_ep_slots, plan_of, stats_of

from rnq_ep.memory import expert_bytes
from rnq_ep.metrics import score_plan
from rnq_ep.specs import SpecError, load_cluster, load_model

MODEL = load_model("tiny")  # 8 experts, top-2
CLUSTER = load_cluster("cpu4")  # 4 workers


def test_plain_ep_on_uniform_load_is_perfectly_balanced():
    plan = plan_of(MODEL, CLUSTER, [plain_ep_slots(MODEL, CLUSTER)])
    score = score_plan(plan, stats_of(MODEL, [[100] * 8]))
    assert score.balancedness_shares[0] == pytest.approx(1.0)
    assert score.balancedness_best[0] == pytest.approx(1.0)
    assert score.lis[0] == pytest.approx(1.0)
    assert score.quantized_fraction[0] == 0.0


def test_plain_ep_balancedness_is_max_gpu_over_mean_gpu():
    plan = plan_of(MODEL, CLUSTER, [plain_ep_slots(MODEL, CLUSTER)])
    score = score_plan(plan, stats_of(MODEL, [[500, 100, 100, 100, 50, 50, 50, 50]]))
    # GPU loads 600, 200, 100, 100 -> mean 250
    np.testing.assert_array_equal(score.best_loads[0], [600, 200, 100, 100])
    assert score.balancedness_best[0] == pytest.approx(600 / 250)
    assert score.lis[0] == pytest.approx(500 / (1000 / 8))


def test_replicating_the_hot_expert_lowers_best_split_balancedness_to_the_lp_bound():
    slots = plain_ep_slots(MODEL, CLUSTER)
    slots = [(g, e, f, 0.5 if e == 0 else s) for g, e, f, s in slots] + [(3, 0, "int8", 0.5)]
    plan = plan_of(MODEL, CLUSTER, [slots])
    counts = [[600, 100, 100, 100, 50, 50, 50, 50]]  # total 1100, mean 275
    score = score_plan(plan, stats_of(MODEL, counts))
    assert score.balancedness_best[0] <= score.balancedness_shares[0]
    assert score.lp_max_load[0] == pytest.approx(score.best_loads[0].max(), abs=1.0)
    assert score.lis[0] == pytest.approx(300 / (1100 / 8))  # the replica takes half of expert 0


def test_quantized_fraction_counts_tokens_on_int8_copies():
    slots = [(g, e, "int8" if e == 7 else f, s) for g, e, f, s in plain_ep_slots(MODEL, CLUSTER)]
    plan = plan_of(MODEL, CLUSTER, [slots])
    score = score_plan(plan, stats_of(MODEL, [[10, 10, 10, 10, 10, 10, 10, 30]]))
    assert score.quantized_fraction[0] == pytest.approx(30 / 100)


def test_planned_quantized_fraction_follows_the_shares():
    slots = plain_ep_slots(MODEL, CLUSTER)
    slots = [(g, e, f, 0.5 if e == 0 else s) for g, e, f, s in slots] + [(3, 0, "int8", 0.5)]
    plan = plan_of(MODEL, CLUSTER, [slots])
    score = score_plan(plan, stats_of(MODEL, [[600, 100, 100, 100, 50, 50, 50, 50]]))
    assert score.quantized_fraction_shares[0] == pytest.approx(300 / 1100)


def test_bytes_per_gpu_is_the_sum_of_its_copies_bytes():
    slots = [(g, e, "int4" if e == 1 else f, s) for g, e, f, s in plain_ep_slots(MODEL, CLUSTER)]
    plan = plan_of(MODEL, CLUSTER, [slots])
    score = score_plan(plan, stats_of(MODEL, [[1] * 8]))
    bf16, int4 = expert_bytes(MODEL, "bf16"), expert_bytes(MODEL, "int4")
    np.testing.assert_array_equal(score.bytes_per_gpu[0], [bf16 + int4, 2 * bf16, 2 * bf16, 2 * bf16])


def test_summary_gives_min_median_max_over_layers():
    plan = plan_of(MODEL, CLUSTER, [plain_ep_slots(MODEL, CLUSTER)] * 3)
    counts = [[100] * 8, [400] + [100] * 7, [700] + [100] * 7]
    summary = score_plan(plan, stats_of(MODEL, counts)).summary()
    best = summary["balancedness_best"]
    assert best["min"] == pytest.approx(1.0)
    assert best["min"] < best["median"] < best["max"]
    assert summary["max_bytes_per_gpu"]["max"] == 2 * expert_bytes(MODEL, "bf16")


def test_eval_loads_with_another_layer_count_are_rejected():
    plan = plan_of(MODEL, CLUSTER, [plain_ep_slots(MODEL, CLUSTER)])
    with pytest.raises(SpecError, match="shape"):
        score_plan(plan, stats_of(MODEL, [[1] * 8, [1] * 8]))


@st.composite
def replicated_plans(draw):
    """tiny model on cpu4: plain EP plus a few extra copies (any format) on GPUs without that expert."""
    slots = plain_ep_slots(MODEL, CLUSTER)
    for expert in draw(st.lists(st.integers(0, 7), max_size=6)):
        free = [g for g in range(4) if (g, expert) not in {(s[0], s[1]) for s in slots}]
        if free:
            slots.append((draw(st.sampled_from(free)), expert, draw(st.sampled_from(["bf16", "int8", "int4"])), 0.0))
    copies = {e: sum(1 for s in slots if s[1] == e) for e in range(8)}
    slots = sorted((g, e, f, 1.0 / copies[e]) for g, e, f, _ in slots)
    counts = draw(st.lists(st.integers(0, 5000), min_size=8, max_size=8))
    return plan_of(MODEL, CLUSTER, [slots]), stats_of(MODEL, [counts])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(replicated_plans())
def test_lp_bound_is_below_both_splits_and_every_token_is_counted(case):
    plan, loads = case
    score = score_plan(plan, loads)
    total = sum(loads.counts[0])
    assert score.best_loads[0].sum() == total == score.share_loads[0].sum()
    assert score.lp_max_load[0] <= score.best_loads[0].max() + 1e-6
    assert score.lp_max_load[0] <= score.share_loads[0].max() + 1e-6
    assert 0.0 <= score.quantized_fraction[0] <= 1.0
    assert score.balancedness_best[0] >= 1.0 - 1e-12
