"""Baselines for comparison: plain EP (contiguous blocks) and an EPLB-equivalent, both all-bf16."""

from __future__ import annotations

import math

import numpy as np

from rnq_ep.memory import expert_bytes, gpu_budget
from rnq_ep.planner.eplb import rebalance_experts
from rnq_ep.planner.layout import InfeasiblePlan, equal_shares, gpu_bytes, layer_plan, raise_if_over_budget
from rnq_ep.specs import ClusterSpec, LoadStats, ModelSpec, Plan, PlanOptions, SpecError

BF16_ONLY = PlanOptions(formats=("bf16",), quality_budget=0.0)


def plan_plain_ep(model: ModelSpec, cluster: ClusterSpec, loads: LoadStats) -> Plan:
    """Plain EP: GPU g holds experts [g*k, (g+1)*k), k = ceil(E/G), all bf16, share 1."""
    num_gpus, num_experts = cluster.num_gpus, model.num_experts
    if num_gpus > num_experts:
        raise SpecError(
            f"plain EP needs at least one expert per GPU: cluster {cluster.name!r} has {num_gpus} GPUs "
            f"but model {model.name!r} has {num_experts} experts (R&Q and EPLB fill extra GPUs with replicas)"
        )
    per_gpu = math.ceil(num_experts / num_gpus)
    expert = np.arange(num_experts, dtype=np.int64)
    gpu = expert // per_gpu
    fmt = np.zeros(num_experts, dtype=np.int64)
    raise_if_over_budget(gpu_bytes(gpu, fmt, model, num_gpus), gpu_budget(model, cluster), "plain EP")
    share = np.ones(num_experts)
    layers = [layer_plan(layer, gpu, expert, fmt, share) for layer in loads.layers]
    return Plan(model=model, cluster=cluster, options=BF16_ONLY, layers=layers)


def eplb_slots_per_gpu(model: ModelSpec, cluster: ClusterSpec, extra_memory: float) -> int:
    """bf16 slots per GPU that the EPLB-equivalent gets with `extra_memory` more bytes than the budget."""
    needed = math.ceil(model.num_experts / cluster.num_gpus)
    budget = gpu_budget(model, cluster) * (1.0 + extra_memory)
    slots = math.floor(budget / expert_bytes(model, "bf16"))
    if slots < needed:
        raise InfeasiblePlan(
            f"EPLB-equivalent: every GPU needs {needed} bf16 experts "
            f"({needed * expert_bytes(model, 'bf16')} bytes) but gets {int(budget)} bytes; "
            f"all {cluster.num_gpus} GPUs miss {int(needed * expert_bytes(model, 'bf16') - budget)} bytes"
        )
    return slots


def plan_eplb(
    model: ModelSpec, cluster: ClusterSpec, loads: LoadStats, extra_memory: float = 0.0, num_groups: int | None = None
) -> Plan:
    """EPLB-equivalent: floor(budget*(1+extra_memory)/bf16) slots per GPU, shares 1/logcnt.

    `num_groups` (the model's routing groups, e.g. 8 for DeepSeek-V3) turns on EPLB's hierarchical
    policy when it divides by the node count; by default the global policy is used.
    """
    if extra_memory < 0:
        raise SpecError(f"extra_memory must be >= 0, got {extra_memory}")
    num_gpus, num_experts = cluster.num_gpus, model.num_experts
    per_gpu = eplb_slots_per_gpu(model, cluster, extra_memory)
    weight = np.asarray(loads.counts, dtype=np.float64)
    groups, nodes = (num_groups, cluster.nodes) if num_groups else (1, 1)
    phy2log, _, _ = rebalance_experts(weight, per_gpu * num_gpus, groups, nodes, num_gpus)
    gpu = np.arange(per_gpu * num_gpus, dtype=np.int64) // per_gpu
    fmt = np.zeros_like(gpu)
    layers = []
    for layer, experts in zip(loads.layers, phy2log):
        experts = separate_duplicates(experts, weight[len(layers)], per_gpu, cluster.gpus_per_node)
        layers.append(layer_plan(layer, gpu, experts, fmt, equal_shares(experts, num_experts)))
    return Plan(model=model, cluster=cluster, options=BF16_ONLY, layers=layers)


def separate_duplicates(phy2log: np.ndarray, weight: np.ndarray, per_gpu: int, gpus_per_node: int) -> np.ndarray:
    """Swap copies so no GPU holds one expert twice (EPLB allows it); phy2log [P] -> [P].

    A second copy on a GPU trades places with the copy of most similar load per copy on another
    GPU (same node first) such that neither GPU then holds its new expert twice. An expert with
    more copies than there are GPUs (EPLB does not cap copies) keeps its duplicates.
    """
    experts = phy2log.copy()
    per_copy = weight[experts] / np.bincount(experts, minlength=weight.size)[experts]
    by_gpu = experts.reshape(-1, per_gpu)
    for slot in range(experts.size):
        g, e = divmod(slot, per_gpu)[0], experts[slot]
        if np.count_nonzero(by_gpu[g] == e) < 2 or slot % per_gpu == np.argmax(by_gpu[g] == e):
            continue
        other_gpu = np.arange(experts.size) // per_gpu
        holds_e = np.isin(other_gpu, np.flatnonzero((by_gpu == e).any(axis=1)))
        lands_twice = np.array([(by_gpu[g] == x).any() for x in experts])
        candidates = np.flatnonzero(~holds_e & ~lands_twice)
        if candidates.size == 0:
            continue
        other_node = (other_gpu[candidates] // gpus_per_node) != (g // gpus_per_node)
        best = candidates[np.lexsort((np.abs(per_copy[candidates] - per_copy[slot]), other_node))[0]]
        experts[slot], experts[best] = experts[best], experts[slot]
        per_copy[slot], per_copy[best] = per_copy[best], per_copy[slot]
    return experts
