"""`rnq-ep bench e2e`: its policies and plans, the runs it dedupes, its error and table, one tiny run on 2 ranks, and a
spilling LLEP row on 4 spawned ranks."""

from __future__ import annotations

from dataclasses import replace

import msgspec
import numpy as np
import pytest
import torch

from handmade_plans import plain_ep_slots, plan_of, stats_of
from rnq_ep.bench.e2e import (
    CASES, NOT_RUN, RUNTIME_ROUTING, SPILLING, e2e_table, first_identical, main, output_error, plan_rows,
)
from rnq_ep.bench.e2e_runs import RowRun, run_single_gpu, single_gpu_plan, spawn_e2e, spill_figures
from rnq_ep.bench.layer import Measured
from rnq_ep.demo import unsharded_outputs
from rnq_ep.memory import expert_bytes, plain_ep_budget
from rnq_ep.metrics import gpu_bytes, layer_tables
from rnq_ep.policies import POLICIES
from rnq_ep.runtime.inputs import layer_counts
from rnq_ep.specs import load_cluster, load_model, load_stats


def _small(name: str):
    return msgspec.structs.replace(load_model(name), hidden_size=32, moe_intermediate_size=64)


def _rows(case: str, ranks: int = 4):
    model = _small(CASES[case].model)
    cluster = msgspec.structs.replace(load_cluster("cpu4"), nodes=1, gpus_per_node=ranks)
    loads = load_stats(CASES[case].plan_loads), load_stats(CASES[case].run_loads)
    return model, plan_rows(model, cluster, *loads, tokens=64)


def test_every_policy_spilling_ones_included_gets_a_plan_that_the_runtime_can_route():
    _, rows = _rows("olmoe")
    assert [row.policy for row in rows] == list(POLICIES)
    assert all(row.plan is not None and row.policy.routing in RUNTIME_ROUTING for row in rows)


def test_a_spilling_policy_runs_apart_from_its_placement_twin_and_each_spill_format_apart():
    _, rows = _rows("olmoe")
    same = first_identical(rows)
    spilling = [i for i, row in enumerate(rows) if row.policy.routing in SPILLING]
    assert len(spilling) == 3 and all(same[i] == i for i in spilling)


def test_rnq_stays_within_plain_ep_memory_and_eplb_within_its_extra():
    model, rows = _rows("olmoe")
    budget = plain_ep_budget(model, 4)
    for row in rows:
        if row.plan is not None:
            most = max(int(gpu_bytes(model, table).max()) for table in layer_tables(row.plan))
            assert most <= budget * (1 + row.policy.extra_memory)


def test_eplb_with_no_room_for_a_whole_replica_runs_once_for_both_memories_and_copy_choices():
    _, rows = _rows("mixtral")  # 8 experts on 4 workers: 2 per worker, +25 % holds no third
    same = first_identical(rows)
    eplb = [i for i, row in enumerate(rows) if row.policy.placement == "eplb"]
    assert {same[i] for i in eplb} == {eplb[0]}


def test_eplb_with_replicas_runs_each_copy_choice_separately():
    _, rows = _rows("olmoe")
    same = first_identical(rows)
    assert all(same[i] == i for i, row in enumerate(rows) if row.policy.placement == "eplb")


def test_single_gpu_variant_puts_every_copy_on_one_worker_with_its_planned_share():
    _, rows = _rows("olmoe")
    rnq = next(row.plan for row in rows if row.policy.name == "R&Q bf16+int8+int4")
    one = single_gpu_plan(rnq)
    assert one.cluster.num_gpus == 1
    assert [[(s.gpu, s.expert, s.fmt, s.share) for s in layer.slots] for layer in one.layers] == [
        [(0, s.expert, s.fmt, s.share) for s in layer.slots] for layer in rnq.layers]


def test_single_gpu_variant_runs_at_world_size_one(tmp_path):
    _, rows = _rows("olmoe")  # on CPU here: the same path a GPU takes, with the torch kernels
    rnq = next(row for row in rows if row.policy.name == "R&Q bf16+int8")
    assert run_single_gpu(rnq.plan, tmp_path, CASES["olmoe"].run_loads, tokens=8, steps=1, seed=0) > 0


def test_output_error_is_the_max_abs_and_the_l2_ratio_over_ranks_and_steps():
    reference = [[torch.tensor([[3.0, 4.0]])], [torch.tensor([[0.0, 0.0]])]]
    outputs = [[torch.tensor([[3.0, 4.5]])], [torch.tensor([[0.0, -0.5]])]]
    max_abs, relative = output_error(outputs, reference)
    assert max_abs == 0.5
    assert relative == pytest.approx(np.sqrt(0.5) / 5.0)


def test_table_gives_speedups_over_plain_ep_and_the_weights_each_spilling_row_moved():
    model, rows = _rows("olmoe")
    plain = Measured(wall_s=2.0, critical_s=1.0, balancedness=1.5, mb_sent=3.0, mb_sent_no_dedupe=4.0)
    faster = Measured(wall_s=1.0, critical_s=0.5, balancedness=1.1, mb_sent=2.0, mb_sent_no_dedupe=3.0)
    budget = plain_ep_budget(model, 4)
    for i, row in enumerate(rows):
        row.measured["spawn"] = plain if i == 0 else faster
        if row.policy.routing in SPILLING:
            rows[i] = replace(row, spill=(1.25, 2.0, budget * 2))
    table = e2e_table(rows, model, 4, CASES["olmoe"], 64, ("spawn",))
    by_name = {cells[0]: dict(zip(table.header, cells)) for cells in table.rows}
    rnq = by_name["R&Q bf16+int8"]
    assert (rnq["spawn wall speedup"], rnq["spawn critical speedup"]) == ("2.00x", "2.00x")
    assert rnq["max/mean tokens per worker"] == "1.10"
    assert rnq["weights moved MB/step (copies)"] == "0"
    for name in ("LLEP spill", "R&Q + int8 spill", "R&Q + int4 spill"):
        assert by_name[name]["spawn critical speedup"] == "2.00x"
        assert by_name[name]["weights moved MB/step (copies)"] == "1.25 (2)"
        assert by_name[name]["memory / plain EP"] == "2.000"
    assert "predicted only" not in table.note
    assert "not run, no GPU" in table.note or torch.cuda.is_available()


@pytest.mark.slow
def test_tiny_run_under_both_launchers_prints_every_policy_with_its_error(tmp_path, capsys):
    markdown = tmp_path / "e2e.md"
    argv = ["--cases", "mixtral", "--ranks", "2", "--hidden", "32", "--inter", "64", "--tokens", "16", "--steps", "1",
            "--markdown", str(markdown)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert all(policy.name in rows for policy in POLICIES)
    assert float(rows["plain EP"][-2]) < 1e-4  # bf16 experts, fp32 math: the reference up to rounding
    assert float(rows["LLEP spill"][-2]) < 1e-4  # bf16 spilled copies too
    assert all(NOT_RUN not in rows[name][-2:] for name in ("R&Q + int8 spill", "R&Q + int4 spill"))
    assert markdown.read_text().count("| R&Q bf16+int8 |") == 1


@pytest.mark.slow
def test_a_spawned_llep_row_moves_bf16_copies_and_still_equals_the_dense_reference():
    model, cluster = load_model("tiny"), load_cluster("cpu4")  # 8 experts, top-2, on 4 workers
    plan = plan_of(model, cluster, [plain_ep_slots(model, cluster)])
    stats = stats_of(model, [[40, 40, 1, 1, 1, 1, 1, 1]])  # experts 0 and 1 (worker 0): ~3.7x the mean load
    rows = [RowRun(plan, "static"), RowRun(plan, "static", spill_fmt="bf16")]
    per_rank = spawn_e2e(4, rows, layer_counts(plan, stats), tokens=640, steps=1, seed=0)  # [rank][row][step]
    moved_mb, copies, peak = spill_figures([rank[1] for rank in per_rank], model, layer_tables(plan))
    assert copies >= 1 and moved_mb == pytest.approx(copies * expert_bytes(model, "bf16") / 1e6)
    assert peak > plain_ep_budget(model, 4)  # a worker held a spilled copy on top of its own
    reference = unsharded_outputs(plan, model, stats, 4, 640, 2, 0)
    for row in range(2):
        outputs = [[s.output for s in rank[row]] for rank in per_rank]
        assert output_error(outputs, reference)[0] < 1e-5
