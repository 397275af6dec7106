"""run_worker (the entry torchrun and Ray call), its batch generation, and a real torchrun launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from gloo import run_ranks
from rnq_ep.layer import SharedExperts
from rnq_ep.runtime.inputs import draw_routing, inclusion_probabilities, layer_counts, make_batch, random_shared_experts
from rnq_ep.demo import unsharded_outputs
from rnq_ep.memory import plain_ep_budget
from rnq_ep.runtime.worker import run_worker
from rnq_ep.specs import (
    LayerPlan,
    LoadStats,
    Plan,
    PlanOptions,
    Slot,
    SpecError,
    encode_json,
    load_cluster,
    load_model,
    load_plan,
)

MODEL = load_model("tiny")
REPO = Path(__file__).resolve().parent.parent


def write_plan(path: Path, num_gpus: int, layer_ids: tuple[int, ...] = (0, 1)) -> str:
    """A tiny plan: experts round-robin over GPUs, expert 0 replicated on every GPU, experts 6-7 int8."""
    cluster = msgspec.structs.replace(load_cluster("cpu4"), gpus_per_node=num_gpus)
    slots = [(e % num_gpus, e, "int8" if e >= 6 else "bf16") for e in range(1, MODEL.num_experts)]
    slots += [(g, 0, "bf16") for g in range(num_gpus)]
    layers = [
        LayerPlan(layer=layer, slots=[Slot(gpu=g, expert=e, fmt=f, share=1.0 / num_gpus if e == 0 else 1.0)
                                      for g, e, f in sorted(slots)])
        for layer in layer_ids
    ]
    room = PlanOptions(memory_budget=plain_ep_budget(MODEL, 1))  # every expert fits on every GPU: a valid plan
    plan = Plan(model=MODEL, cluster=cluster, options=room, layers=layers)
    path.write_bytes(encode_json(plan))
    return str(path)


def skewed_loads(path: Path) -> str:
    """Loads for decoder layers 0 and 1 where expert 0 takes most tokens."""
    counts = [[900, 50, 40, 30, 20, 10, 5, 1], [10, 10, 10, 10, 10, 10, 10, 930]]
    path.write_bytes(encode_json(LoadStats(counts=counts, num_experts=8, top_k=2, layer_ids=[0, 1])))
    return str(path)


def test_draw_routing_gives_distinct_experts_per_token():
    ids, weights = draw_routing(np.arange(1.0, 9.0), 500, 3, torch.Generator().manual_seed(0))
    assert ids.shape == weights.shape == (500, 3)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(500))


def test_draw_routing_follows_the_counts():
    counts = np.array([8.0, 4.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    ids, _ = draw_routing(counts, 20000, 1, torch.Generator().manual_seed(0))
    frequency = np.bincount(ids.flatten().numpy(), minlength=8) / 20000
    np.testing.assert_allclose(frequency, counts / counts.sum(), atol=0.01)


def test_heavy_experts_are_drawn_as_often_as_the_load_file_says():
    counts = np.array([60.0, 20.0, 10.0, 4.0, 3.0, 2.0, 1.0, 0.0])  # expert 0 in 90 % of top-3 picks
    ids, _ = draw_routing(counts, 20000, 3, torch.Generator().manual_seed(1))
    frequency = np.bincount(ids.flatten().numpy(), minlength=8) / 20000
    np.testing.assert_allclose(frequency, inclusion_probabilities(counts, 3), atol=0.015)


def test_inclusion_probabilities_cap_at_one_and_sum_to_top_k():
    prob = inclusion_probabilities(np.array([100.0, 1.0, 1.0, 0.0]), 2)
    np.testing.assert_allclose(prob, [1.0, 0.5, 0.5, 0.0])


def test_fewer_loaded_experts_than_top_k_still_gives_distinct_experts():
    ids, _ = draw_routing(np.array([5.0, 0.0, 0.0, 0.0]), 100, 3, torch.Generator().manual_seed(2))
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all() and (ids == 0).any(dim=1).all()


def test_draw_routing_is_reproducible_from_the_seed():
    first = draw_routing(np.ones(8), 64, 2, torch.Generator().manual_seed(5))
    second = draw_routing(np.ones(8), 64, 2, torch.Generator().manual_seed(5))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_load_rows_are_matched_to_plan_layers_by_layer_id(tmp_path):
    plan = msgspec.json.decode(Path(write_plan(tmp_path / "p.json", 1, layer_ids=(1, 0))).read_bytes(), type=Plan)
    loads = LoadStats(counts=[[1] * 8, [2] * 8], num_experts=8, top_k=2, layer_ids=[0, 1])
    assert [row[0] for row in layer_counts(plan, loads)] == [2.0, 1.0]


def test_load_file_with_other_layers_is_rejected(tmp_path):
    plan = msgspec.json.decode(Path(write_plan(tmp_path / "p.json", 1)).read_bytes(), type=Plan)
    loads = LoadStats(counts=[[1] * 8] * 3, num_experts=8, top_k=2, layer_ids=[4, 5, 6])
    with pytest.raises(SpecError, match="loads: has layers \\[4, 5, 6\\], the plan has layers \\[0, 1\\]"):
        layer_counts(plan, loads)


def test_plan_for_another_world_size_names_both(tmp_path):
    plan = write_plan(tmp_path / "plan.json", 2)
    with pytest.raises(SpecError, match="the plan has 2 GPUs but the world size is 1"):
        run_worker(0, 1, plan, steps=1, tokens=4)


def test_a_model_with_another_expert_count_is_rejected(tmp_path):
    plan = write_plan(tmp_path / "plan.json", 1)
    with pytest.raises(SpecError, match="model 'olmoe-1b-7b' has 64 experts, top-8; the plan is for 'tiny'"):
        run_worker(0, 1, plan, model="olmoe-1b-7b", steps=1, tokens=4)


def test_single_process_run_is_reproducible(tmp_path):
    plan, loads = write_plan(tmp_path / "plan.json", 1), skewed_loads(tmp_path / "loads.json")
    first = run_worker(0, 1, plan, tokens=16, steps=2, loads=loads, backend="torch", keep_outputs=True)
    second = run_worker(0, 1, plan, tokens=16, steps=2, loads=loads, backend="torch", keep_outputs=True)
    assert [s.step for s in first] == [0, 1]
    assert all(torch.equal(a.output, b.output) for a, b in zip(first, second))
    assert first[0].tokens_per_gpu.tolist() == [2 * 16 * MODEL.top_k]


def test_a_model_with_shared_experts_adds_them_to_each_layer_output(tmp_path):
    plan = write_plan(tmp_path / "plan.json", 1, layer_ids=(0,))
    with_shared = msgspec.structs.replace(MODEL, num_shared_experts=2)
    routed = run_worker(0, 1, plan, tokens=8, steps=1, backend="torch", keep_outputs=True)[0].output
    both = run_worker(0, 1, plan, model=with_shared, tokens=8, steps=1, backend="torch", keep_outputs=True)[0].output
    hidden, _ = make_batch(MODEL, [np.ones(MODEL.num_experts)], 8, 0, 0, 0)  # step 0's batch of rank 0, seed 0
    shared = SharedExperts(*random_shared_experts(with_shared, 0, 0))
    assert random_shared_experts(MODEL, 0, 0) is None
    torch.testing.assert_close(both, routed + shared(hidden), rtol=1e-5, atol=1e-5)


def test_the_dense_reference_adds_the_shared_experts_as_run_worker_does(tmp_path):
    plan = write_plain_plan(tmp_path / "plan.json", 1)  # bf16 only: the reference is unquantized
    with_shared = msgspec.structs.replace(MODEL, num_shared_experts=2)
    stats = run_worker(0, 1, plan, model=with_shared, tokens=8, steps=2, backend="torch", keep_outputs=True)
    reference = unsharded_outputs(load_plan(plan), with_shared, None, world=1, tokens=8, steps=2, seed=0)[0]
    for step, expected in zip(stats, reference):
        torch.testing.assert_close(step.output, expected, rtol=1e-5, atol=1e-5)


def test_shared_expert_weights_are_not_a_replay_of_a_batch_draw():
    with_shared = msgspec.structs.replace(MODEL, num_shared_experts=1)
    for layer in range(3):
        gate_up, _ = random_shared_experts(with_shared, layer, 0)  # [2I, H]
        hidden, _ = make_batch(MODEL, [np.ones(MODEL.num_experts)], 4, 0, layer, 1)  # rank `layer`, step 1
        cosine = torch.nn.functional.cosine_similarity(gate_up[0].float(), hidden[0], dim=0)
        assert abs(float(cosine)) < 0.5


def test_a_run_from_a_first_step_gives_the_later_steps_of_a_full_run(tmp_path):
    plan, loads = write_plan(tmp_path / "plan.json", 1), skewed_loads(tmp_path / "loads.json")
    full = run_worker(0, 1, plan, tokens=16, steps=3, loads=loads, backend="torch", keep_outputs=True)
    resumed = run_worker(0, 1, plan, tokens=16, steps=3, loads=loads, backend="torch", keep_outputs=True, first_step=1)
    assert [s.step for s in resumed] == [1, 2]
    assert all(torch.equal(a.output, b.output) for a, b in zip(full[1:], resumed))


def test_a_first_step_past_the_last_is_rejected(tmp_path):
    plan = write_plan(tmp_path / "plan.json", 1)
    with pytest.raises(SpecError, match=r"first_step 2: expected an integer in \[0, 1\]"):
        run_worker(0, 1, plan, steps=2, tokens=4, first_step=2)


def test_given_batches_replace_the_drawn_ones_and_each_step_is_reported(tmp_path):
    plan = write_plan(tmp_path / "plan.json", 1)
    drawn = run_worker(0, 1, plan, tokens=8, steps=2, seed=5, backend="torch", keep_outputs=True)
    other = make_batch(MODEL, [np.ones(MODEL.num_experts)] * 2, 8, 5, 0, 1)  # step 1's draw, fed at both steps
    reported = []
    fed = run_worker(0, 1, plan, tokens=8, steps=2, seed=5, backend="torch", keep_outputs=True,
                     batches=lambda step: other, on_step=reported.append)
    assert [s.step for s in reported] == [0, 1] and all(a is b for a, b in zip(reported, fed))
    assert torch.equal(fed[0].output, drawn[1].output) and torch.equal(fed[1].output, drawn[1].output)


def test_interleaved_plans_run_every_step_on_the_same_batch_taking_turns(tmp_path):
    plan, loads = write_plan(tmp_path / "plan.json", 1), skewed_loads(tmp_path / "loads.json")
    alone = run_worker(0, 1, plan, tokens=8, steps=2, loads=loads, backend="torch", keep_outputs=True)
    both = run_worker(0, 1, plan, tokens=8, steps=2, loads=loads, backend="torch", keep_outputs=True, interleave=[plan])
    assert [(s.step, s.plan) for s in both] == [(0, 0), (0, 1), (1, 1), (1, 0)]
    for s in both:
        assert torch.equal(s.output, alone[s.step].output)


def _runs(rank: int, world: int, plan: str, loads: str, tokens: int, variants: dict[str, dict]) -> dict[str, list]:
    """This rank's per-step stats (outputs kept, 2 steps) of each named variant of run_worker's keywords, in turn."""
    return {name: run_worker(rank, world, plan, tokens=tokens, steps=2, loads=loads, backend="torch", keep_outputs=True,
                             **kwargs) for name, kwargs in variants.items()}


@pytest.mark.slow
def test_routing_policy_changes_balance_not_outputs(tmp_path):
    plan, loads = write_plan(tmp_path / "plan.json", 2), skewed_loads(tmp_path / "loads.json")
    per_rank = run_ranks(_runs, 2, plan, loads, 16, {policy: {"policy": policy} for policy in ("least-loaded", "hash")})
    for by_policy in per_rank:
        for a, b in zip(by_policy["least-loaded"], by_policy["hash"]):
            torch.testing.assert_close(a.output, b.output, rtol=1e-5, atol=1e-5)
    balance = {policy: np.mean([s.balancedness for s in steps]) for policy, steps in per_rank[0].items()}
    assert balance["least-loaded"] < balance["hash"]


@pytest.mark.slow
def test_launch_script_runs_one_process_per_planned_gpu_and_prints_the_step_table(tmp_path):
    plan, loads = write_plan(tmp_path / "plan.json", 2), skewed_loads(tmp_path / "loads.json")
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), plan, "--loads", loads, "--tokens", "16", "--steps", "2"],
        capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks, policy least-loaded" in done.stdout
    assert "balancedness" in done.stdout and "expert rows per GPU" in done.stdout


@pytest.mark.slow
def test_torchrun_with_fewer_processes_than_planned_gpus_exits_naming_both(tmp_path):
    plan = write_plan(tmp_path / "plan.json", 2)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
         "-m", "rnq_ep", "run", "--plan", plan, "--tokens", "4", "--steps", "1"],
        capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    assert "the plan has 2 GPUs but the world size is 1" in done.stderr


def negative_share_plan(tmp_path: Path) -> str:
    """write_plan's 2-GPU plan with a negative share in layer 0."""
    raw = msgspec.json.decode(Path(write_plan(tmp_path / "good.json", 2)).read_bytes())
    raw["layers"][0]["slots"][1]["share"] = -0.5
    path = tmp_path / "bad.json"
    path.write_bytes(msgspec.json.encode(raw))
    return str(path)


@pytest.mark.slow
def test_under_torchrun_a_bad_plan_is_one_line_from_one_rank_and_no_rank_joins_a_group(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "rnq_ep", "run", "--plan", negative_share_plan(tmp_path), "--tokens", "4", "--steps", "1"],
        capture_output=True, text=True, timeout=180, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.stderr.count("share -0.5, expected a finite number >= 0") == 1
    assert "exitcode  : 2" in done.stderr  # torchrun's own report names the rank's exit code (docs/runtime.md)


@pytest.mark.slow
def test_the_launch_script_refuses_a_bad_plan_before_torchrun_starts(tmp_path):
    done = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), negative_share_plan(tmp_path), "--steps", "1"],
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "share -0.5" in done.stderr and "ChildFailedError" not in done.stderr


def write_plain_plan(path: Path, num_gpus: int) -> str:
    """Plain EP for decoder layers 0 and 1: GPU g holds experts [g*k, (g+1)*k), bf16."""
    cluster = msgspec.structs.replace(load_cluster("cpu4"), gpus_per_node=num_gpus)
    per_gpu = MODEL.num_experts // num_gpus
    slots = [Slot(gpu=e // per_gpu, expert=e, fmt="bf16", share=1.0) for e in range(MODEL.num_experts)]
    plan = Plan(model=MODEL, cluster=cluster, options=PlanOptions(), layers=[LayerPlan(layer=i, slots=slots) for i in (0, 1)])
    path.write_bytes(encode_json(plan))
    return str(path)


@pytest.mark.slow
def test_spilling_in_bf16_moves_weights_and_evens_the_load_without_changing_outputs(tmp_path):
    plan, loads = write_plain_plan(tmp_path / "plan.json", 2), skewed_loads(tmp_path / "loads.json")
    variants = {"plain": {"policy": "static"}, "llep": {"policy": "static", "spill_fmt": "bf16"}}  # same batches
    per_rank = run_ranks(_runs, 2, plan, loads, 1024, variants)
    for runs in per_rank:
        for plain, llep in zip(runs["plain"], runs["llep"]):
            torch.testing.assert_close(llep.output, plain.output, rtol=1e-5, atol=1e-5)
    steps = per_rank[0]
    assert all(s.spilled_bytes == 0 for s in steps["plain"]) and all(s.spilled_bytes > 0 for s in steps["llep"])
    assert max(s.balancedness for s in steps["llep"]) < min(s.balancedness for s in steps["plain"])


def test_an_unknown_spill_format_is_rejected(tmp_path):
    with pytest.raises(SpecError, match="--spill 'fp8': expected one of bf16, int8, int4"):
        run_worker(0, 1, write_plain_plan(tmp_path / "plan.json", 1), tokens=4, steps=1, spill_fmt="fp8")


def test_spilling_with_online_rebalancing_is_refused(tmp_path):
    with pytest.raises(SpecError, match="online rebalancing runs one plan and does not spill"):
        run_worker(0, 1, write_plain_plan(tmp_path / "plan.json", 1), tokens=4, steps=1, spill_fmt="int4",
                   rebalance_interval=2)
