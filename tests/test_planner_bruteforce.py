"""R&Q placement vs the exhaustive optimum on tiny instances (<= 6 experts, 3 GPUs, bf16 only).

The optimum enumerates every choice of a non-empty GPU set per expert within the slot limit;
for a fixed placement the best fractional split has max GPU load = max over GPU subsets S of
(tokens of experts whose copies all lie in S) / |S| (Hall's condition). The greedy planner
cannot make two-step moves (evict a cold copy to make room for a replica), so it is not always
optimal: on 300 random instances it was optimal on 287 and never worse than 1.13x the optimum;
the test asserts >= 90 % optimal and BOUND on 60 of them. With the HiGHS refine it is optimal.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rnq_ep.memory import expert_bytes
from rnq_ep.planner import plan_rnq
from rnq_ep.specs import ClusterSpec, LoadStats, ModelSpec, PlanOptions

NUM_GPUS = 3
BOUND = 1.15  # worst seen over 300 random instances: 1.13


def optimum_max_load(weight: np.ndarray, slots_per_gpu: int) -> float:
    """Smallest max GPU load over all placements with <= slots_per_gpu copies per GPU."""
    masks = np.array(list(itertools.product(range(1, 2**NUM_GPUS), repeat=weight.size)))  # [N, E] GPU sets
    held = np.stack([((masks >> g) & 1).sum(axis=1) for g in range(NUM_GPUS)], axis=1)
    masks = masks[(held <= slots_per_gpu).all(axis=1)]
    worst = np.zeros(len(masks))
    for subset in range(1, 2**NUM_GPUS):
        confined = (masks & ~subset) == 0
        worst = np.maximum(worst, (confined * weight).sum(axis=1) / bin(subset).count("1"))
    return float(worst.min())


def planned_max_load(weight: np.ndarray, slots_per_gpu: int, refine: bool = False) -> float:
    model = ModelSpec(name="tiny", num_layers=1, num_experts=weight.size, top_k=1, hidden_size=64, moe_intermediate_size=64)
    cluster = ClusterSpec(
        name="c3", nodes=1, gpus_per_node=NUM_GPUS, hbm_bytes_per_s=1e12, peak_flops=1e15,
        intra_node_bytes_per_s=1e11, inter_node_bytes_per_s=1e11,
    )
    options = PlanOptions(formats=("bf16",), memory_budget=slots_per_gpu * expert_bytes(model, "bf16"), refine=refine)
    plan = plan_rnq(model, cluster, LoadStats(counts=[weight.tolist()], num_experts=weight.size, top_k=1), options)
    load = np.zeros(NUM_GPUS)
    for slot in plan.layers[0].slots:
        load[slot.gpu] += slot.share * weight[slot.expert]
    return float(load.max())


def tiny_instances(count: int):
    rng = np.random.default_rng(0)
    for _ in range(count):
        num_experts = int(rng.integers(2, 7))
        slots = int(rng.integers(math.ceil(num_experts / NUM_GPUS), math.ceil(num_experts / NUM_GPUS) + 3))
        yield rng.integers(0, 100, num_experts) * rng.integers(1, 4, num_experts), slots


def test_placement_is_optimal_on_most_tiny_instances_and_within_bound_on_all():
    ratios = []
    for weight, slots in tiny_instances(60):
        best = optimum_max_load(weight, slots)
        ours = planned_max_load(weight, slots)
        assert ours >= best - 1e-6, "cannot beat the exhaustive optimum"
        ratios.append(ours / best if best > 0 else 1.0)
    ratios = np.array(ratios)
    assert ratios.max() <= BOUND
    assert (ratios <= 1 + 1e-6).mean() >= 0.9


def test_one_hot_expert_is_spread_over_every_gpu_with_room():
    weight = np.array([300, 0, 0])
    assert planned_max_load(weight, 2) == optimum_max_load(weight, 2) == 100


def test_refine_reaches_the_exhaustive_optimum_on_tiny_instances():
    for weight, slots in tiny_instances(25):
        assert planned_max_load(weight, slots, refine=True) == pytest.approx(optimum_max_load(weight, slots), rel=1e-6)
