"""Small plans written by hand for the metrics, cost model and CLI tests (no planner needed)."""

from __future__ import annotations

from rnq_ep.specs import ClusterSpec, LayerPlan, LoadStats, ModelSpec, Plan, PlanOptions, Slot


def plan_of(model: ModelSpec, cluster: ClusterSpec, layers: list[list[tuple[int, int, str, float]]]) -> Plan:
    """Plan from per-layer lists of (gpu, expert, fmt, share)."""
    return Plan(
        model=model,
        cluster=cluster,
        options=PlanOptions(),
        layers=[
            LayerPlan(layer=i, slots=[Slot(gpu=g, expert=e, fmt=f, share=s) for g, e, f, s in slots])
            for i, slots in enumerate(layers)
        ],
    )


def plain_ep_slots(model: ModelSpec, cluster: ClusterSpec, fmt: str = "bf16") -> list[tuple[int, int, str, float]]:
    """Contiguous blocks of E/G experts per GPU, one copy each."""
    per_gpu = -(-model.num_experts // cluster.num_gpus)
    return [(e // per_gpu, e, fmt, 1.0) for e in range(model.num_experts)]


def stats_of(model: ModelSpec, counts: list[list[int]]) -> LoadStats:
    """LoadStats for `model` with the given [L][E] counts."""
    return LoadStats(counts=counts, num_experts=model.num_experts, top_k=model.top_k)
