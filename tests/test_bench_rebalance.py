"""bench rebalance, cost-model part: it prices only the moves the rebalancer would make, and staging one
layer per step stalls less than stop-the-world; the CPU part runs on 2 gloo ranks."""

import msgspec
import pytest

from rnq_ep.bench.rebalance import cpu_table
from rnq_ep.bench.rebalance_cost import cost_model_table
from rnq_ep.specs import load_model


def test_staged_stalls_less_than_stop_the_world_and_moves_at_most_the_layer():
    table = cost_model_table([64], layers=1, tokens_per_gpu=4096, seed=0)
    (row,) = table.rows
    assert row[0] == "64" and row[1] == "1 of 1"  # the drifted hot set makes the move pay for itself
    moved, layer = float(row[2].split()[0]), float(row[2].split()[-1])
    assert 0 < moved <= layer  # GB of the layer's new copies that move, never more than the layer holds
    staged, world = float(row[5]), float(row[7])
    assert 1.0 <= staged <= world


def test_a_replan_that_gains_nothing_moves_no_bytes():
    # 256 experts on 256 GPUs, plain-EP memory, bf16+int8: two int8 copies do not fit one bf16 expert's
    # bytes, so every plan holds one copy per GPU and a re-plan can only relabel experts: no gain, no move
    table = cost_model_table([256], layers=1, tokens_per_gpu=4096, seed=0, formats=("bf16", "int8"))
    (row,) = table.rows
    stale, after = row[3].split(" -> ")
    assert row[1] == "0 of 1" and stale == after
    assert float(row[4]) == 0.0 and float(row[6]) == 0.0


@pytest.mark.slow
def test_the_cpu_part_times_every_kind_of_step_and_stages_fewer_bytes_per_step_than_stop_the_world():
    model = msgspec.structs.replace(load_model("tiny"), name="tiny@bench", num_layers=2)
    table = cpu_table(model, ranks=2, rounds=1, tokens=16, copies_per_step=2, seed=0)
    rows = {row[0].split(":")[0].split(" (")[0]: row for row in table.rows}
    assert set(rows) == {"steady state", "staged", "stop-the-world reload"}
    assert len(table.rows) == 4  # steady, copy-staging, switch, stop-the-world
    staged_mb = max(float(row[1]) for row in table.rows[1:3])
    assert 0 < staged_mb < float(rows["stop-the-world reload"][1])
