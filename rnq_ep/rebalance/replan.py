"""Re-plan from a window of live counts, with a migration-cost term (pure: no process groups).

1. Plan afresh on the window (R&Q by default).
2. Keep copies in place: the new layer's nodes, and GPUs within each node, are relabelled (Hungarian
   assignments: GPUs within every pair of nodes, then nodes on those values) so as many of the old
   copies' bytes as possible stay where they are; nodes are alike and GPUs within a node are alike,
   so the relabelled plan has the same memory, balance and predicted time. Then copies that would
   still move are swapped with same-format copies on a GPU that held their expert (`swaps.py`),
   kept only if the layer's predicted time grows by at most SWAP_SLACK.
3. Move a layer only if it pays for itself: predicted step-time gain over `horizon_steps` steps
   must exceed the link time of its moves (cost model), and the step must get at least MIN_GAIN
   faster (hysteresis: a window's sampling noise alone should not churn copies); otherwise the
   layer keeps its old plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np
from scipy.optimize import linear_sum_assignment

from rnq_ep.balance import SlotTable, water_fill
from rnq_ep.costmodel import predict_layer_time, scale_counts, weight_move_time
from rnq_ep.memory import expert_bytes
from rnq_ep.planner import plan_rnq
from rnq_ep.rebalance.moves import copy_moves, moved_bytes
from rnq_ep.rebalance.swaps import SWAP_SLACK, swap_into_place
from rnq_ep.specs import ClusterSpec, LayerPlan, LoadStats, ModelSpec, Plan, Slot

MIN_GAIN = 0.03  # smallest relative step-time saving worth a move (a 4-step window of real loads is ~2 % noisy)
Planner = Callable[[Plan, np.ndarray], Plan]  # (current plan, window counts [L, E]) -> candidate plan


@dataclass(frozen=True)
class LayerDecision:
    """Whether one layer moves to its new plan, and why."""

    layer: int
    move: bool
    gain_s: float  # predicted step-time saving over the horizon
    cost_s: float  # predicted link time of the moves
    bytes_moved: int  # copies sent or reloaded, in their target formats
    bytes_if_bf16: int  # the same copies if all were bf16 (quantized copies are cheaper to move)
    copies_moved: int


@dataclass(frozen=True)
class Replan:
    """A candidate plan (unmoved layers keep their old slots) and the per-layer decisions."""

    plan: Plan
    decisions: list[LayerDecision]


def window_loads(plan: Plan, counts: np.ndarray) -> LoadStats:
    """LoadStats of window counts [L, E] for `plan`'s model, with its layer ids."""
    return LoadStats(
        counts=np.asarray(counts, np.int64).tolist(),
        num_experts=plan.model.num_experts,
        top_k=plan.model.top_k,
        layer_ids=[layer.layer for layer in plan.layers],
    )


def plan_from_window(plan: Plan, counts: np.ndarray) -> Plan:
    """R&Q plan of the same model, cluster and options for window counts [L, E]."""
    return plan_rnq(plan.model, plan.cluster, window_loads(plan, counts), plan.options)


def replan(
    plan: Plan,
    counts: np.ndarray,
    horizon_steps: int,
    tokens_per_gpu: int,
    planner: Planner = plan_from_window,
) -> Replan:
    """Candidate plan for window counts [L, E], kept in place, each layer moved only if it pays for itself."""
    counts = np.asarray(counts)
    if counts.shape != (len(plan.layers), plan.model.num_experts):
        raise ValueError(f"window counts have shape {counts.shape}, expected ({len(plan.layers)}, {plan.model.num_experts})")
    fresh = planner(plan, counts)
    model, cluster = plan.model, plan.cluster
    layers, decisions = [], []
    for old, new, row in zip(plan.layers, fresh.layers, counts):
        new = placed_like(old, new, row, model, cluster, tokens_per_gpu)
        decision = _decide(old, new, row, model, cluster, horizon_steps, tokens_per_gpu)
        layers.append(new if decision.move else old)
        decisions.append(decision)
    return Replan(msgspec.structs.replace(plan, layers=layers, summary={}), decisions)


def placed_like(
    old: LayerPlan, new: LayerPlan, counts: np.ndarray, model: ModelSpec, cluster: ClusterSpec, tokens_per_gpu: int
) -> LayerPlan:
    """`new` relabelled to keep old copies in place, then swapped into place where the layer's predicted time for
    counts [E] grows by at most SWAP_SLACK: the layer replan would move to."""
    new = keep_in_place(old, new, model, cluster)
    swapped = swap_into_place(old, new, counts)
    time_of = lambda layer: _layer_time(layer, counts, model, cluster, tokens_per_gpu)  # noqa: E731
    return swapped if time_of(swapped) <= (1 + SWAP_SLACK) * time_of(new) else new


def keep_in_place(old: LayerPlan, new: LayerPlan, model: ModelSpec, cluster: ClusterSpec) -> LayerPlan:
    """`new` with whole nodes, then GPUs within each node, relabelled to keep the most old-copy bytes in place."""
    g, per = cluster.num_gpus, cluster.gpus_per_node
    nodes = g // per
    kept = _kept_bytes(old, new, model, g).reshape(nodes, per, nodes, per)  # [old node, old local, new node, new local]
    within = np.tile(np.arange(per), (nodes, nodes, 1))  # [old node, new node, new local] -> old local
    value = np.zeros((nodes, nodes))  # bytes kept if new node b takes old node a's label
    for a, b in zip(*np.nonzero(kept.sum(axis=(1, 3)))):
        old_local, new_local = linear_sum_assignment(kept[a, :, b, :], maximize=True)
        within[a, b, new_local] = old_local
        value[a, b] = kept[a, old_local, b, new_local].sum()
    old_node, new_node = linear_sum_assignment(value, maximize=True)
    label = np.empty(g, dtype=np.int64)
    for a, b in zip(old_node, new_node):
        label[b * per : (b + 1) * per] = a * per + within[a, b]
    slots = [Slot(gpu=int(label[s.gpu]), expert=s.expert, fmt=s.fmt, share=s.share) for s in new.slots]
    return LayerPlan(layer=new.layer, slots=sorted(slots, key=lambda s: s.gpu))  # stable: local order kept


def _kept_bytes(old: LayerPlan, new: LayerPlan, model: ModelSpec, num_gpus: int) -> np.ndarray:
    """[old gpu, new gpu] bytes of new copies the old GPU could keep (same format, or made from its bf16 copy)."""
    held: dict[int, list[tuple[int, str]]] = {}
    for slot in old.slots:
        held.setdefault(slot.expert, []).append((slot.gpu, slot.fmt))
    kept = np.zeros((num_gpus, num_gpus))
    for slot in new.slots:
        for gpu, fmt in held.get(slot.expert, ()):
            if fmt == slot.fmt or fmt == "bf16":
                kept[gpu, slot.gpu] += expert_bytes(model, slot.fmt)
    return kept


def _decide(
    old: LayerPlan,
    new: LayerPlan,
    counts: np.ndarray,
    model: ModelSpec,
    cluster: ClusterSpec,
    horizon_steps: int,
    tokens_per_gpu: int,
) -> LayerDecision:
    """Gain over the horizon vs link time of the moves (checkpoint reloads priced at the inter-node link)."""
    g, e = cluster.num_gpus, model.num_experts
    old_table, new_table = SlotTable.from_layer(old, g, e), SlotTable.from_layer(new, g, e)
    times = [_layer_time(layer, counts, model, cluster, tokens_per_gpu) for layer in (old, new)]
    moves = copy_moves(old_table, new_table, model)
    host = np.zeros(g)
    for move in moves:
        if move.kind == "host":
            host[move.dst] += expert_bytes(model, move.fmt)
    peer = [(m.src, m.dst, m.fmt) for m in moves if m.kind == "peer"]
    cost = weight_move_time(model, cluster, peer) + float(host.max(initial=0.0)) / cluster.inter_node_bytes_per_s
    bytes_moved, bytes_if_bf16 = moved_bytes(moves, model)
    gain = (times[0] - times[1]) * horizon_steps
    changed = any(m.kind != "keep" for m in moves) or len(old.slots) != len(new.slots)
    return LayerDecision(
        layer=old.layer,
        move=changed and gain > cost and times[0] - times[1] > MIN_GAIN * times[0],
        gain_s=gain,
        cost_s=cost,
        bytes_moved=bytes_moved,
        bytes_if_bf16=bytes_if_bf16,
        copies_moved=sum(m.kind in ("peer", "host") for m in moves),
    )


def _layer_time(layer: LayerPlan, counts: np.ndarray, model: ModelSpec, cluster: ClusterSpec, tokens_per_gpu: int) -> float:
    """Predicted seconds of one layer for window counts [E] under least-loaded routing (cost model)."""
    table = SlotTable.from_layer(layer, cluster.num_gpus, model.num_experts)
    scaled = scale_counts(np.asarray(counts, np.float64), model, cluster.num_gpus, tokens_per_gpu)
    return predict_layer_time(model, cluster, table, water_fill(table, scaled)).total_s
