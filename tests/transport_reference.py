"""The dumb twin of `planner.transport`: the pass of one layer on its own arrays, for oracle tests.

This is `transport_spread` as it was before `transport_layers` ran many layers end to end;
`transport_layers` must give every layer exactly these copies and quantized tokens.
"""

from __future__ import annotations

import numpy as np

from rnq_ep.planner.limits import Limits
from rnq_ep.planner.quantize import cheapest_conversions_by_gpu
from rnq_ep.planner.transport import Copies


def transport_reference(copies: Copies, limits: Limits, num_gpus: int, num_experts: int) -> tuple[Copies, float]:
    """(New copies that move every GPU's excess to the GPUs below the mean where they fit, their quantized tokens)."""
    gpu, expert, fmt, tokens = copies
    load = np.bincount(gpu, weights=tokens, minlength=num_gpus)
    target = load.sum() / num_gpus
    tol = max(target * 1e-9, 1e-12)
    excess = np.maximum(load - target, 0.0)
    deficit = np.where(load < target - tol, target - load, 0.0)
    if excess.max() <= tol or deficit.max() <= tol:
        return copies, float(tokens[fmt > 0].sum())
    giver, amount = _giving_pieces(gpu, tokens, excess)
    sinks = np.flatnonzero(deficit > 0)
    give_end, take_end = np.cumsum(amount), np.cumsum(deficit[sinks])
    edges = np.sort(np.concatenate([give_end, take_end]))
    distinct = np.concatenate(([True], edges[1:] != edges[:-1]))
    edges = edges[distinct & (edges <= min(give_end[-1], take_end[-1]) + tol)]
    moved = edges - np.concatenate(([0.0], edges[:-1]))
    middle = edges - moved / 2
    keep = moved > tol
    slot = giver[np.searchsorted(give_end, middle[keep])]
    sink = sinks[np.minimum(np.searchsorted(take_end, middle[keep]), sinks.size - 1)]
    moved = moved[keep]
    allowed = _allowed_pieces(gpu, expert, slot, sink, limits, num_gpus, num_experts)
    return _apply_pieces(copies, slot[allowed], sink[allowed], moved[allowed], limits, num_gpus)


def _giving_pieces(gpu: np.ndarray, tokens: np.ndarray, excess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per over-loaded GPU (in GPU order), its copies heaviest first, cut at its excess -> (slot [p], amount [p])."""
    candidates = np.flatnonzero(excess[gpu] > 0)
    order = candidates[np.lexsort((-tokens[candidates], gpu[candidates]))]
    held = tokens[order]
    before = np.cumsum(held) - held
    first = np.searchsorted(gpu[order], gpu[order], side="left")
    before -= before[first]  # tokens of heavier copies on the same GPU
    amount = np.minimum(held, np.maximum(excess[gpu[order]] - before, 0.0))
    keep = amount > 0
    return order[keep], amount[keep]


def _allowed_pieces(
    gpu: np.ndarray,
    expert: np.ndarray,
    slot: np.ndarray,
    sink: np.ndarray,
    limits: Limits,
    num_gpus: int,
    num_experts: int,
) -> np.ndarray:
    """Mask [p] of pieces that add no duplicate copy and respect max_copies and max_held."""
    piece_expert = expert[slot]
    holds = np.zeros((num_experts, num_gpus), dtype=bool)
    holds[expert, gpu] = True
    allowed = ~holds[piece_expert, sink]
    pair = piece_expert * num_gpus + sink
    order = np.argsort(pair, kind="stable")
    first = np.zeros(slot.size, dtype=bool)
    first[order[np.concatenate(([True], pair[order][1:] != pair[order][:-1]))]] = True  # each pair's first piece
    allowed &= first
    copies = np.bincount(expert, minlength=num_experts)
    allowed &= _rank_among(piece_expert, allowed) < limits.max_copies - copies[piece_expert]
    held = np.bincount(gpu, minlength=num_gpus)
    allowed &= _rank_among(sink, allowed) < limits.max_held - held[sink]
    return allowed


def _rank_among(group: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """For masked items, their index among masked items of the same group (in order); others get a huge rank."""
    rank = np.full(group.size, np.iinfo(np.int64).max)
    idx = np.flatnonzero(mask)
    order = idx[np.argsort(group[idx], kind="stable")]
    first = np.searchsorted(group[order], group[order], side="left")
    rank[order] = np.arange(order.size) - first
    return rank


def _apply_pieces(
    copies: Copies, slot: np.ndarray, sink: np.ndarray, moved: np.ndarray, limits: Limits, num_gpus: int
) -> tuple[Copies, float]:
    """Add the pieces as bf16 copies, re-format to fit; undo pieces on GPUs that still do not fit
    -> (copies, quantized tokens)."""
    gpu, expert, fmt, tokens = copies
    fmt_bytes = limits.fmt_bytes
    new_gpu = np.concatenate([gpu, sink])
    new_expert = np.concatenate([expert, expert[slot]])
    new_tokens = np.concatenate([tokens, moved])
    np.subtract.at(new_tokens, slot, moved)
    new_fmt = np.concatenate([fmt, np.zeros(slot.size, dtype=fmt.dtype)])
    over = np.maximum(np.bincount(new_gpu, weights=fmt_bytes[new_fmt], minlength=num_gpus) - limits.budget, 0)
    new_fmt = cheapest_conversions_by_gpu(
        new_gpu, new_fmt, new_tokens, limits.cost[new_expert], fmt_bytes, over, allow_smallest=False
    )
    still_over = np.bincount(new_gpu, weights=fmt_bytes[new_fmt], minlength=num_gpus) > limits.budget
    if still_over.any():
        undo = still_over[sink]
        return _apply_pieces(copies, slot[~undo], sink[~undo], moved[~undo], limits, num_gpus)
    quantized = float(new_tokens[new_fmt > 0].sum())
    # copies that gave all their tokens away are dropped: another copy of the expert holds them
    total = np.bincount(new_expert, weights=new_tokens, minlength=int(new_expert.max()) + 1)
    tol = max(new_tokens.sum() * 1e-12, 1e-12)
    keep = (new_tokens > tol) | (total[new_expert] <= tol)
    return (new_gpu[keep], new_expert[keep], new_fmt[keep], new_tokens[keep]), quantized
