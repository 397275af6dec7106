"""`rnq-ep bench e2e`: its policies and plans, the runs it dedupes, its error and table, one tiny run on 2 ranks."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from rnq_ep.bench.e2e import (
    CASES, NOT_RUN, RUNTIME_ROUTING, e2e_table, first_identical, main, output_error, plan_rows, run_single_gpu, single_gpu_plan,
)
from rnq_ep.bench.layer import Measured
from rnq_ep.memory import plain_ep_budget
from rnq_ep.metrics import gpu_bytes, layer_tables
from rnq_ep.policies import LLEP, POLICIES
from rnq_ep.specs import load_cluster, load_model, load_stats


def _small(name: str):
    return msgspec.structs.replace(load_model(name), hidden_size=32, moe_intermediate_size=64)


def _rows(case: str, ranks: int = 4):
    model = _small(CASES[case].model)
    cluster = msgspec.structs.replace(load_cluster("cpu4"), nodes=1, gpus_per_node=ranks)
    loads = load_stats(CASES[case].plan_loads), load_stats(CASES[case].run_loads)
    return model, plan_rows(model, cluster, *loads, tokens=64)


def test_every_policy_but_llep_gets_a_plan_that_the_runtime_can_route():
    _, rows = _rows("olmoe")
    assert [row.policy for row in rows] == list(POLICIES)
    for row in rows:
        if row.policy.routing == LLEP:
            assert row.plan is None and "predicted only" in row.note
        else:
            assert row.plan is not None and row.policy.routing in RUNTIME_ROUTING


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
    assert run_single_gpu(rnq, tmp_path, CASES["olmoe"].run_loads, tokens=8, steps=1, seed=0) > 0


def test_output_error_is_the_max_abs_and_the_l2_ratio_over_ranks_and_steps():
    reference = [[torch.tensor([[3.0, 4.0]])], [torch.tensor([[0.0, 0.0]])]]
    outputs = [[torch.tensor([[3.0, 4.5]])], [torch.tensor([[0.0, -0.5]])]]
    max_abs, relative = output_error(outputs, reference)
    assert max_abs == 0.5
    assert relative == pytest.approx(np.sqrt(0.5) / 5.0)


def test_table_gives_speedups_over_plain_ep_and_llep_only_its_prediction():
    model, rows = _rows("olmoe")
    plain = Measured(wall_s=2.0, critical_s=1.0, balancedness=1.5, mb_sent=3.0, mb_sent_no_dedupe=4.0)
    faster = Measured(wall_s=1.0, critical_s=0.5, balancedness=1.1, mb_sent=2.0, mb_sent_no_dedupe=3.0)
    for i, row in enumerate(rows):
        if row.plan is not None:
            row.measured["spawn"] = plain if i == 0 else faster
    table = e2e_table(rows, model, 4, CASES["olmoe"], 64, ("spawn",))
    by_name = {cells[0]: dict(zip(table.header, cells)) for cells in table.rows}
    rnq = by_name["R&Q bf16+int8"]
    assert (rnq["spawn wall speedup"], rnq["spawn critical speedup"]) == ("2.00x", "2.00x")
    assert rnq["max/mean tokens per worker"] == "1.10"
    llep = by_name["LLEP spill"]
    assert llep["predicted speedup (cost model)"] != NOT_RUN
    assert llep["spawn critical speedup"] == llep["max/mean tokens per worker"] == NOT_RUN
    assert "LLEP spill: predicted only" in table.note
    assert "not run, no GPU" in table.note or torch.cuda.is_available()


@pytest.mark.slow
def test_tiny_run_under_both_launchers_prints_every_policy_with_its_error(tmp_path, capsys):
    markdown = tmp_path / "e2e.md"
    argv = ["--cases", "mixtral", "--ranks", "2", "--hidden", "32", "--inter", "64", "--tokens", "16", "--steps", "1",
            "--markdown", str(markdown)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert all(policy.name in rows for policy in POLICIES)
    plain_error = float(rows["plain EP"].split(" | ")[-2])  # bf16 experts, fp32 math: the reference up to rounding
    assert plain_error < 1e-4
    assert markdown.read_text().count("| R&Q bf16+int8 |") == 1
