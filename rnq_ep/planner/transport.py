"""Vectorised first pass of the spread: pair every GPU's excess with other GPUs' deficits at once.

The excess of the over-loaded GPUs (their heaviest copies first) and the deficit of the
under-loaded GPUs are laid end to end on two tapes of equal length (the wrap-around rule); each
piece where a giving copy overlaps a receiving GPU becomes a new copy of that expert there.
Pieces that would put a second copy of an expert on a GPU, exceed max_copies, exceed a GPU's
copy count, or leave a GPU over its bytes after re-formatting are left on their source;
`replicate.spread_load` finishes sequentially. Both tapes run in GPU order, so sources and
sinks pair up mostly within a node.

`transport_layers` makes the pass of many layers at once: their copies end to end (GPU g of layer l
is l * G + g, expert e is l * E + e), numpy over all of them, with sums, cumulative sums and searches
restarting at each layer, so every layer gets the copies its own pass gives.
"""

from __future__ import annotations

import numpy as np

from rnq_ep.planner.limits import Limits
from rnq_ep.planner.quantize import cheapest_conversions_by_gpu

Copies = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # gpu, expert, fmt, tokens: [S] each
# layers handled together span at most this many (expert, GPU) cells: past that, the arrays cost page
# faults and cache misses rather than Python calls (at 1024 GPUs x 256 experts, 4 layers)
BATCH_CELLS = 2**20
NOT_RANKED = np.iinfo(np.int64).max


def transport_spread(copies: Copies, limits: Limits, num_gpus: int, num_experts: int) -> tuple[Copies, float]:
    """(New copies that move every GPU's excess to the GPUs below the mean where they fit, their quantized
    tokens). The quality budget is the caller's check (over it, keep the given copies): the pass does not
    read it, so a layer's re-plans with a smaller budget reuse one pass."""
    return transport_layers([copies], [limits], num_gpus, num_experts)[0]


def stack_layers(copies_of: list[Copies], num_gpus: int) -> tuple[np.ndarray, Copies]:
    """(layer of each copy [S], the [L] layers' copies concatenated [S], layer l's GPUs numbered l x G + g), so
    per-GPU numpy work runs for all layers in one call."""
    layer = np.repeat(np.arange(len(copies_of)), [copies[0].size for copies in copies_of])
    gpu, expert, fmt, tokens = (np.concatenate([copies[k] for copies in copies_of]) for k in range(4))
    return layer, (gpu + layer * num_gpus, expert, fmt, tokens)


def transport_layers(
    copies_of: list[Copies], limits_of: list[Limits], num_gpus: int, num_experts: int
) -> list[tuple[Copies, float]]:
    """`transport_spread` of every layer: [L] copies and limits (of one model: the same fmt_bytes) -> [L]
    (copies, quantized tokens)."""
    num_layers, batch = len(copies_of), max(1, BATCH_CELLS // (num_experts * num_gpus))
    if num_layers > batch:
        return [
            result for lo in range(0, num_layers, batch)
            for result in transport_layers(copies_of[lo : lo + batch], limits_of[lo : lo + batch], num_gpus, num_experts)
        ]
    if not num_layers:
        return []
    layer, (gpu, expert, fmt, tokens) = stack_layers(copies_of, num_gpus)
    expert = expert + layer * num_experts
    load = np.bincount(gpu, weights=tokens, minlength=num_layers * num_gpus).reshape(num_layers, num_gpus)
    target = load.sum(axis=1) / num_gpus  # [L]
    tol = np.maximum(target * 1e-9, 1e-12)
    excess = np.maximum(load - target[:, None], 0.0)
    deficit = np.where(load < (target - tol)[:, None], target[:, None] - load, 0.0)
    moving = (excess.max(axis=1) > tol) & (deficit.max(axis=1) > tol)
    if not moving.all():  # balanced layers, or none below the mean: the copies stay as they are
        results = [(copies, float(copies[3][copies[2] > 0].sum())) for copies in copies_of]
        some = np.flatnonzero(moving).tolist()
        if some:
            moved = transport_layers([copies_of[i] for i in some], [limits_of[i] for i in some], num_gpus, num_experts)
            for index, result in zip(some, moved):
                results[index] = result
        return results
    excess, deficit = excess.ravel(), deficit.ravel()
    giver, amount = _giving_pieces(gpu, tokens, excess, num_layers, num_gpus)
    sinks = np.flatnonzero(deficit > 0)
    give_layer, take_layer = gpu[giver] // num_gpus, sinks // num_gpus
    give_end = _cumsum_by_layer(amount, give_layer, num_layers)
    take_end = _cumsum_by_layer(deficit[sinks], take_layer, num_layers)
    every = np.arange(num_layers)
    shorter = np.minimum(
        give_end[np.searchsorted(give_layer, every, side="right") - 1], take_end[np.searchsorted(take_layer, every, side="right") - 1]
    )
    ends, end_layer = np.concatenate([give_end, take_end]), np.concatenate([give_layer, take_layer])
    order = np.lexsort((ends, end_layer))  # each layer's tape edges, ascending
    edges, edge_layer = ends[order], end_layer[order]
    distinct = np.concatenate(([True], (edges[1:] != edges[:-1]) | (edge_layer[1:] != edge_layer[:-1])))
    keep = distinct & (edges <= (shorter + tol)[edge_layer])
    edges, edge_layer = edges[keep], edge_layer[keep]
    first = np.concatenate(([True], edge_layer[1:] != edge_layer[:-1]))
    moved = edges - np.where(first, 0.0, np.concatenate(([0.0], edges[:-1])))
    middle = edges - moved / 2
    keep = moved > tol[edge_layer]
    middle, middle_layer, moved = middle[keep], edge_layer[keep], moved[keep]
    slot = giver[_search_by_layer(give_end, give_layer, middle, middle_layer)]
    last_sink = np.searchsorted(take_layer, middle_layer, side="right") - 1
    sink = sinks[np.minimum(_search_by_layer(take_end, take_layer, middle, middle_layer), last_sink)]
    allowed = _allowed_pieces(gpu, expert, slot, sink, limits_of, num_gpus, num_experts)
    return _apply_pieces((layer, gpu, expert, fmt, tokens), slot[allowed], sink[allowed], moved[allowed], limits_of, num_gpus, num_experts)


def _cumsum_by_layer(values: np.ndarray, layer: np.ndarray, num_layers: int) -> np.ndarray:
    """np.cumsum of each layer's values [n] (layer [n] ascending) on its own -> [n]: the same floats."""
    column = np.arange(values.size) - np.searchsorted(layer, np.arange(num_layers))[layer]
    table = np.zeros((num_layers, int(column.max()) + 1 if values.size else 1))
    table[layer, column] = values
    return np.cumsum(table, axis=1)[layer, column]


def _search_by_layer(ends: np.ndarray, end_layer: np.ndarray, value: np.ndarray, value_layer: np.ndarray) -> np.ndarray:
    """For each value [m] (layers ascending), np.searchsorted of its layer's ends in them, as an index into ends [n]
    (ascending within each layer, layers ascending)."""
    every = np.arange(int(max(end_layer.max(initial=0), value_layer.max(initial=0))) + 2)
    end_bounds, value_bounds = (np.searchsorted(layer, every).tolist() for layer in (end_layer, value_layer))
    return np.concatenate([
        lo + np.searchsorted(ends[lo:hi], value[first:last])
        for lo, hi, first, last in zip(end_bounds[:-1], end_bounds[1:], value_bounds[:-1], value_bounds[1:])
    ])


def _giving_pieces(
    gpu: np.ndarray, tokens: np.ndarray, excess: np.ndarray, num_layers: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per over-loaded GPU (in GPU order), its copies heaviest first, cut at its excess -> (slot [p], amount [p])."""
    candidates = np.flatnonzero(excess[gpu] > 0)
    order = candidates[np.lexsort((-tokens[candidates], gpu[candidates]))]
    held = tokens[order]
    before = _cumsum_by_layer(held, gpu[order] // num_gpus, num_layers) - held
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
    limits_of: list[Limits],
    num_gpus: int,
    num_experts: int,
) -> np.ndarray:
    """Mask [p] of pieces that add no duplicate copy and respect their layer's max_copies and max_held."""
    num_layers, piece_layer = len(limits_of), sink // num_gpus
    piece_expert = expert[slot]
    holds = np.zeros((num_layers * num_experts, num_gpus), dtype=bool)
    holds[expert, gpu % num_gpus] = True
    allowed = ~holds[piece_expert, sink % num_gpus]
    pair = piece_expert * num_gpus + sink % num_gpus
    order = np.argsort(pair, kind="stable")
    first = np.zeros(slot.size, dtype=bool)
    first[order[np.concatenate(([True], pair[order][1:] != pair[order][:-1]))]] = True  # each pair's first piece
    allowed &= first
    copies = np.bincount(expert, minlength=num_layers * num_experts)
    max_copies, max_held = (np.array([getattr(limits, key) for limits in limits_of])[piece_layer] for key in ("max_copies", "max_held"))
    allowed &= _rank_among(piece_expert, allowed) < max_copies - copies[piece_expert]
    held = np.bincount(gpu, minlength=num_layers * num_gpus)
    allowed &= _rank_among(sink, allowed) < max_held - held[sink]
    return allowed


def _rank_among(group: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """For masked items, their index among masked items of the same group (in order); others get a huge rank."""
    rank = np.full(group.size, NOT_RANKED)
    idx = np.flatnonzero(mask)
    order = idx[np.argsort(group[idx], kind="stable")]
    first = np.searchsorted(group[order], group[order], side="left")
    rank[order] = np.arange(order.size) - first
    return rank


def _apply_pieces(
    copies: tuple[np.ndarray, ...],
    slot: np.ndarray,
    sink: np.ndarray,
    moved: np.ndarray,
    limits_of: list[Limits],
    num_gpus: int,
    num_experts: int,
) -> list[tuple[Copies, float]]:
    """Add the pieces as bf16 copies, re-format to fit; undo pieces on GPUs that still do not fit. copies: (layer, gpu,
    expert, fmt, tokens) [S] end to end -> per layer (copies, quantized tokens)."""
    layer, gpu, expert, fmt, tokens = copies
    num_layers, fmt_bytes = len(limits_of), limits_of[0].fmt_bytes
    cost = np.concatenate([limits.cost for limits in limits_of])  # [L * E, 3]
    budget = np.repeat([limits.budget for limits in limits_of], num_gpus)  # [L * G]
    order = np.argsort(np.concatenate([layer, layer[slot]]), kind="stable")  # each layer's copies, then its new ones
    position = np.empty_like(order)
    position[order] = np.arange(order.size)
    new_layer = np.concatenate([layer, layer[slot]])[order]
    new_gpu = np.concatenate([gpu, sink])[order]
    new_expert = np.concatenate([expert, expert[slot]])[order]
    new_tokens = np.concatenate([tokens, moved])[order]
    np.subtract.at(new_tokens, position[slot], moved)
    new_fmt = np.concatenate([fmt, np.zeros(slot.size, dtype=fmt.dtype)])[order]
    over = np.maximum(np.bincount(new_gpu, weights=fmt_bytes[new_fmt], minlength=num_layers * num_gpus) - budget, 0)
    new_fmt = cheapest_conversions_by_gpu(new_gpu, new_fmt, new_tokens, cost[new_expert], fmt_bytes, over, allow_smallest=False)
    still_over = np.bincount(new_gpu, weights=fmt_bytes[new_fmt], minlength=num_layers * num_gpus) > budget
    if still_over.any():
        undo = still_over[sink]
        return _apply_pieces(copies, slot[~undo], sink[~undo], moved[~undo], limits_of, num_gpus, num_experts)
    bounds = np.searchsorted(new_layer, np.arange(num_layers + 1)).tolist()
    spans = list(zip(bounds[:-1], bounds[1:]))
    quantized = [float(new_tokens[lo:hi][new_fmt[lo:hi] > 0].sum()) for lo, hi in spans]
    # copies that gave all their tokens away are dropped: another copy of the expert holds them
    total = np.bincount(new_expert, weights=new_tokens, minlength=num_layers * num_experts)
    tol = np.array([max(new_tokens[lo:hi].sum() * 1e-12, 1e-12) for lo, hi in spans])[new_layer]
    keep = (new_tokens > tol) | (total[new_expert] <= tol)
    kept_layer = new_layer[keep]
    local = (new_gpu[keep] - kept_layer * num_gpus, new_expert[keep] - kept_layer * num_experts, new_fmt[keep], new_tokens[keep])
    bounds = np.searchsorted(kept_layer, np.arange(num_layers + 1)).tolist()
    return [
        (tuple(column[lo:hi] for column in local), spent)  # type: ignore[misc]
        for lo, hi, spent in zip(bounds[:-1], bounds[1:], quantized)
    ]
