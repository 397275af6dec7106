"""Drift scenario: routing drawn from one real load file, then another; re-planning on the recorder's
window brings balancedness back within RECOVERY_INTERVALS intervals (single process, 8 simulated GPUs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rnq_ep.balance import SlotTable, gpu_loads, water_fill
from rnq_ep.planner import plan_rnq
from rnq_ep.rebalance.recorder import LoadRecorder
from rnq_ep.rebalance.replan import keep_in_place, replan
from rnq_ep.runtime.inputs import draw_routing
from rnq_ep.specs import PlanOptions, load_cluster, load_model, load_stats

MODEL = load_model("olmoe-1b-7b")  # 64 experts, top-8
CLUSTER = load_cluster("h100x8")
LOADS = Path(__file__).resolve().parent.parent / "configs" / "loads"
BEFORE = LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"
AFTER = LOADS / "olmoe-1b-7b-0924_olmoe-repo_github.json"
TOKENS = 512  # per step, all GPUs
INTERVAL = 4  # steps between re-plans; the window is one interval
DRIFT_STEP = 8
STEPS = 24
RECOVERY_INTERVALS = 2  # the stated bound: balanced again within two intervals of the drift
HORIZON_STEPS = 100  # steps a new plan is expected to serve (the move must pay for itself over these)
SERVED_TOKENS_PER_GPU = 4096  # the cost model prices a prefill-sized step; routing draws stay small


def balancedness(plan, counts: np.ndarray) -> float:
    """Mean over layers of max/mean GPU load under least-loaded routing, counts [L, E]."""
    values = []
    for layer, row in zip(plan.layers, counts):
        table = SlotTable.from_layer(layer, CLUSTER.num_gpus, MODEL.num_experts)
        load = gpu_loads(table, water_fill(table, row))
        values.append(load.max() / load.mean())
    return float(np.mean(values))


def step_counts(stats, gen: torch.Generator) -> np.ndarray:
    """One step's routed counts [L, E] drawn from a load file's per-expert rates."""
    rows = [draw_routing(np.asarray(row), TOKENS, MODEL.top_k, gen)[0] for row in stats.counts]
    return np.stack([np.bincount(ids.reshape(-1).numpy(), minlength=MODEL.num_experts) for ids in rows])


@pytest.fixture(scope="module")
def drift_run() -> tuple[list[float], list[int], float]:
    """(balancedness per step, steps at which a new plan took effect, offline plan's balancedness on AFTER)."""
    before, after = load_stats(BEFORE), load_stats(AFTER)
    # hedge copies blunt this drift (1.095x instead of > 1.1x); the rebalancer is what is tested here
    plan = plan_rnq(MODEL, CLUSTER, before, PlanOptions(hedge=False))
    recorder = LoadRecorder(len(plan.layers), MODEL.num_experts, window=INTERVAL)
    gen = torch.Generator().manual_seed(0)
    history, switches = [], []
    for step in range(STEPS):
        counts = step_counts(after if step >= DRIFT_STEP else before, gen)
        history.append(balancedness(plan, counts))
        recorder.current += torch.as_tensor(counts)
        recorder.end_step()
        if (step + 1) % INTERVAL == 0:
            result = replan(plan, recorder.snapshot(), HORIZON_STEPS, SERVED_TOKENS_PER_GPU)
            if any(d.move for d in result.decisions):
                plan = result.plan
                switches.append(step + 1)
    offline = plan_rnq(MODEL, CLUSTER, after, PlanOptions(hedge=False))
    return history, switches, balancedness(offline, step_counts(after, gen))


def test_drift_makes_the_stale_plan_unbalanced(drift_run):
    history, _, offline = drift_run
    assert history[DRIFT_STEP] > 1.1 * offline


def test_balancedness_recovers_within_the_stated_intervals(drift_run):
    history, _, offline = drift_run
    recovered = DRIFT_STEP + RECOVERY_INTERVALS * INTERVAL
    assert max(history[recovered:]) < 1.1 * offline
    assert np.mean(history[recovered:]) < np.mean(history[DRIFT_STEP:DRIFT_STEP + INTERVAL])


def test_a_steady_load_moves_nothing_and_a_drift_settles(drift_run):
    _, switches, _ = drift_run
    assert not [s for s in switches if s <= DRIFT_STEP]
    assert 1 <= len(switches) <= RECOVERY_INTERVALS


def test_moves_that_do_not_pay_for_themselves_are_not_made():
    before, after = load_stats(BEFORE), load_stats(AFTER)
    # hedge copies blunt this drift (1.095x instead of > 1.1x); the rebalancer is what is tested here
    plan = plan_rnq(MODEL, CLUSTER, before, PlanOptions(hedge=False))
    counts = np.asarray(after.counts)
    result = replan(plan, counts, horizon_steps=1, tokens_per_gpu=1)
    assert not any(d.move for d in result.decisions)
    assert all(d.gain_s <= d.cost_s for d in result.decisions)
    assert result.plan.layers == plan.layers


def test_quantized_copies_make_moves_cheaper_than_bf16():
    before, after = load_stats(BEFORE), load_stats(AFTER)
    # hedge copies blunt this drift (1.095x instead of > 1.1x); the rebalancer is what is tested here
    plan = plan_rnq(MODEL, CLUSTER, before, PlanOptions(hedge=False))
    result = replan(plan, np.asarray(after.counts), HORIZON_STEPS, SERVED_TOKENS_PER_GPU)
    assert all(d.bytes_moved <= d.bytes_if_bf16 for d in result.decisions)
    assert sum(d.bytes_moved for d in result.decisions) < sum(d.bytes_if_bf16 for d in result.decisions)


def test_keep_in_place_never_moves_more_bytes_than_the_raw_plan():
    before, after = load_stats(BEFORE), load_stats(AFTER)
    old, new = plan_rnq(MODEL, CLUSTER, before, PlanOptions()), plan_rnq(MODEL, CLUSTER, after, PlanOptions())
    for old_layer, new_layer in zip(old.layers, new.layers):
        kept = keep_in_place(old_layer, new_layer, MODEL, CLUSTER)
        assert sorted((s.expert, s.fmt) for s in kept.slots) == sorted((s.expert, s.fmt) for s in new_layer.slots)
        held = {(s.gpu, s.expert, s.fmt) for s in old_layer.slots}
        assert sum((s.gpu, s.expert, s.fmt) in held for s in kept.slots) >= sum((s.gpu, s.expert, s.fmt) in held for s in new_layer.slots)
