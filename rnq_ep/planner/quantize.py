"""Choosing formats: quality cost per token of each format, and freeing bytes on a GPU cheaply.

The quality budget counts tokens served by quantized copies; which copy to quantize is decided by
cost = tokens x sensitivity, so cold experts, thin replicas and robust experts go first.
"""

from __future__ import annotations

import bisect
import itertools
import math

import numpy as np

from rnq_ep.specs import FORMATS, LoadStats, PlanOptions

# Relative output error of a quantized expert when no calibration says otherwise: w8a16 per-channel
# int8 is ~4x more accurate than group-128 int4 on typical expert weights.
DEFAULT_SENSITIVITY = {"bf16": 0.0, "int8": 1.0, "int4": 4.0}


def sensitivity_costs(loads: LoadStats, layer_index: int, options: PlanOptions) -> np.ndarray:
    """Quality cost per routed token of each expert in each format -> [E, 3] (inf where not allowed)."""
    num_experts = loads.num_experts
    cost = np.tile([DEFAULT_SENSITIVITY[f] for f in FORMATS], (num_experts, 1))
    if loads.sensitivity is not None:
        for e, by_fmt in enumerate(loads.sensitivity[layer_index]):
            for fmt, value in by_fmt.items():
                cost[e, FORMATS.index(fmt)] = value
        cost[:, 0] = 0.0
    if loads.importance is not None:  # measured loss change per token; below 0 (noise) counts as 0, never as a gain
        cost *= np.clip(np.asarray(loads.importance[layer_index], dtype=np.float64), 0.0, None)[:, None]
    for code, fmt in enumerate(FORMATS):
        if fmt not in options.formats:
            cost[:, code] = np.inf
    return cost


def cheapest_conversions(
    fmt: np.ndarray, tokens: np.ndarray, cost: np.ndarray, fmt_bytes: np.ndarray, need: int
) -> tuple[np.ndarray, float, float] | None:
    """Re-format some of a GPU's copies to free >= `need` bytes at little quality cost.

    fmt [c] codes, tokens [c], cost [c, 3] per token (inf: not allowed), fmt_bytes [3].
    Each copy moves at most once, to its cheapest format per freed byte (or, if that cannot free
    enough, to its smallest allowed format); copies go in order of cost per freed byte. Returns
    (new fmt [c], added cost, added quantized tokens), or None when nothing frees enough.
    """
    sizes = fmt_bytes.tolist()
    moves = [format_moves(row, sizes)[f] for row, f in zip(cost.tolist(), fmt.tolist())]
    found = conversions_for_needs(fmt.tolist(), tokens.tolist(), moves, [need])[0]
    return None if found is None else (np.array(found[0], dtype=fmt.dtype), found[1], found[2])


def format_moves(cost: list[float], sizes: list[int]) -> list[list[tuple[int, float, int, int]]]:
    """For a copy with quality costs cost [3] held in format f, per f [3]: its moves to smaller allowed formats k
    (larger first) as (k, cost change per token, freed bytes, freed bytes but at least 1)."""
    return [
        [
            (k, c - cost[f], sizes[f] - size, max(sizes[f] - size, 1))
            for k, (size, c) in enumerate(zip(sizes, cost))
            if size < sizes[f] and math.isfinite(c)
        ]
        for f in range(len(sizes))
    ]


def conversions_for_needs(
    fmt: list[int], tokens: list[float], moves: list[list[tuple[int, float, int, int]]], needs: list[int]
) -> list[tuple[list[int], float, float] | None]:
    """`cheapest_conversions` of one GPU's copies (as lists; moves[i]: `format_moves` of copy i in its format)
    for each of several byte needs, sharing the sorting work: (new formats, added cost, added quantized
    tokens) or None per need.

    Plain Python: a GPU holds a handful of copies, where numpy's per-call overhead would dominate.
    """
    results: list[tuple[list[int], float, float] | None] = [(fmt, 0.0, 0.0) if n <= 0 else None for n in needs]
    pending = [i for i, n in enumerate(needs) if n > 0]
    if not pending:
        return results
    cheapest, largest = [], []  # per copy: (cost per freed byte, freed bytes, cost, format) or None
    one_move = True  # every copy has at most one move: the largest moves are the cheapest
    for t, options in zip(tokens, moves):
        cheap = large = None  # the first of equal moves wins: the larger format
        for k, change, gain, divisor in options:
            price = t * change
            move = (price / divisor, gain, price, k)
            if cheap is None or move[0] < cheap[0]:
                cheap = move
            if large is None or move[1] > large[1]:
                large = move
        cheapest.append(cheap)
        largest.append(large)
        one_move = one_move and cheap is large
    if len(fmt) == 1:  # one copy (every GPU at one expert per GPU): nothing to order or add up
        for move in (cheapest[0], largest[0]):
            for p in [p for p in pending if move is not None and move[1] >= needs[p]]:
                results[p] = ([move[3]], float(move[2]), float(tokens[0]) if fmt[0] == 0 else 0.0)
                pending.remove(p)
        return results
    for target in (cheapest,) if one_move else (cheapest, largest):  # the same list again frees no more
        if not pending:
            break
        order = sorted((i for i, m in enumerate(target) if m is not None), key=lambda i: target[i][0])
        freed = list(itertools.accumulate(target[i][1] for i in order))
        for p in [p for p in pending if freed and freed[-1] >= needs[p]]:
            take = order[: bisect.bisect_left(freed, needs[p]) + 1]
            new_fmt = list(fmt)
            for i in take:
                new_fmt[i] = target[i][3]
            added_tokens = sum(tokens[i] for i in take if fmt[i] == 0)
            results[p] = (new_fmt, float(sum(target[i][2] for i in take)), float(added_tokens))
            pending.remove(p)
    return results


def cheapest_conversions_by_gpu(
    gpu: np.ndarray,
    fmt: np.ndarray,
    tokens: np.ndarray,
    cost: np.ndarray,
    fmt_bytes: np.ndarray,
    need: np.ndarray,
    allow_smallest: bool = True,
) -> np.ndarray:
    """`cheapest_conversions` for every GPU at once: gpu/fmt/tokens [S], cost [S, 3], need [G] -> new fmt [S].

    GPUs that cannot free need[g] bytes keep their copies unchanged (callers check the bytes).
    Without `allow_smallest` only the best-ratio format step is used (no fallback to the smallest).
    """
    new_fmt = fmt.copy()
    on = np.flatnonzero(need[gpu] > 0)  # the copies of GPUs that must free bytes; the others keep theirs
    if not on.size:
        return new_fmt
    gpu, fmt, tokens, cost = gpu[on], fmt[on], tokens[on], cost[on]
    rows = np.arange(fmt.size)
    held = fmt_bytes[fmt]
    smaller = np.isfinite(cost) & (fmt_bytes < held[:, None])
    gain = np.where(smaller, held[:, None] - fmt_bytes, 0)
    price = np.where(smaller, tokens[:, None] * np.where(smaller, cost - cost[rows, fmt][:, None], 0.0), np.inf)
    ratio = price / np.maximum(gain, 1)
    pending = need > 0  # [G] GPUs not yet fitted
    targets = (np.argmin(ratio, axis=1), np.argmax(gain, axis=1))
    for target in targets if allow_smallest else targets[:1]:
        movable = smaller[rows, target] & pending[gpu]
        order = np.lexsort((ratio[rows, target], gpu))  # by gpu, then cost per freed byte
        freed = np.where(movable, gain[rows, target], 0)[order]
        before = np.cumsum(freed) - freed
        first = np.searchsorted(gpu[order], gpu[order], side="left")
        before -= before[first]  # bytes freed by the cheaper copies of the same GPU
        enough = np.bincount(gpu[order], weights=freed, minlength=need.size) >= need
        take = order[movable[order] & (before < need[gpu[order]]) & enough[gpu[order]]]
        new_fmt[on[take]] = target[take]
        pending &= ~enough
        if not pending.any():
            break
    return new_fmt
