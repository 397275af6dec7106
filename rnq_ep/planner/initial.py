"""Initial copies: each expert's replicas packed by load, over-budget GPUs re-formatted (steps 1-3).

`initial_copies` makes one layer's for one replica count. `first_fitting_counts` runs the trials of
every layer's first plan at once: for each count, largest first, the layers without a count that fits
yet are checked, packed (`place.pack_rows_by_rounds`) and re-formatted (`cheapest_conversions_by_gpu`
with the layers' GPUs numbered one after another) together, numpy over a layer axis. Each layer gets
what `initial_copies` gives it: the same floats, checks, packing and formats.
"""

from __future__ import annotations

import math

import numpy as np

from rnq_ep.planner.layout import InfeasiblePlan
from rnq_ep.planner.limits import Limits
from rnq_ep.planner.place import pack_by_rounds, pack_rows_by_rounds
from rnq_ep.planner.quantize import cheapest_conversions_by_gpu
from rnq_ep.planner.transport import BATCH_CELLS, Copies


def initial_copies(
    weight: np.ndarray, counts: np.ndarray, num_gpus: int, limits: Limits, layer: int, reuse: dict
) -> Copies:
    """counts [E] copies of each expert, packed by load; GPUs over budget quantize their cheapest copies
    (the packing is kept in `reuse` by replica count: it does not depend on the quality budget)."""
    num_experts = weight.size
    extra = int(counts.sum()) - num_experts
    expert = np.repeat(np.arange(num_experts), counts)
    tokens = weight[expert] / counts[expert]
    needed = fewest_quantized_copies(expert.size, num_gpus, limits) if extra else 0
    if needed and np.partition(tokens, needed - 1)[:needed].sum() > limits.token_budget:
        raise InfeasiblePlan(
            f"layer {layer}: {extra} replicas need at least {needed} quantized copies, more tokens than the "
            f"quality budget allows ({limits.token_budget:.0f} tokens) on the GPUs holding the most copies"
        )
    if ("packed", extra) not in reuse:
        gpu = pack_by_rounds(expert, tokens, num_gpus)
        over = np.maximum(np.bincount(gpu, minlength=num_gpus) * int(limits.fmt_bytes[0]) - limits.budget, 0)
        fmt = np.zeros(expert.size, dtype=np.int64)
        reuse["packed", extra] = gpu, cheapest_conversions_by_gpu(gpu, fmt, tokens, limits.cost[expert], limits.fmt_bytes, over), over
    gpu, fmt, over = reuse["packed", extra]
    still_over = np.bincount(gpu, weights=limits.fmt_bytes[fmt], minlength=num_gpus) > limits.budget
    short = [f"GPU {g} ({int(over[g])} bytes over in bf16)" for g in np.flatnonzero(still_over)]
    if tokens[fmt > 0].sum() > limits.token_budget:
        short = [f"GPU {g} ({int(over[g])} bytes over in bf16)" for g in np.flatnonzero(over > 0)]
    if short:
        raise InfeasiblePlan(
            f"layer {layer}: fitting the budget of {limits.budget} bytes needs more quantized tokens than the "
            f"quality budget allows ({limits.token_budget:.0f} tokens); missing room on {', '.join(short[:8])}"
        )
    return gpu, expert, fmt, tokens


def fewest_quantized_copies(num_copies: int, num_gpus: int, limits: Limits) -> int:
    """Lower bound on copies to quantize when `num_copies` are spread evenly, all in the smallest format."""
    most = math.ceil(num_copies / num_gpus)
    crowded = num_copies - (most - 1) * num_gpus  # GPUs holding `most` copies, the rest hold one fewer
    smallest = limits.smallest_common
    saved = int(limits.fmt_bytes[0]) - smallest
    if saved == 0:
        return 0
    per_gpu = [max(0, math.ceil((m * int(limits.fmt_bytes[0]) - limits.budget) / saved)) for m in (most, most - 1)]
    return crowded * per_gpu[0] + (num_gpus - crowded) * per_gpu[1]


def first_fitting_counts(
    weights: np.ndarray,
    rankings: list[np.ndarray],
    num_gpus: int,
    limits_of: list[Limits],
    replica_limits_of: list[Limits],
    counts: list[int],
    reuses: list[dict],
) -> list[tuple[int, Copies | None]]:
    """Per layer of weights [L, E]: the first of the replica counts `counts` (descending) to try, and its
    `initial_copies` when they fit the layer's limits (replica_limits_of[l] for a positive count, limits_of[l]
    for 0), else (0, None): the counts before it do not fit. Every packing made goes into reuses[l] as
    `initial_copies` keeps it. rankings[l]: `place.replica_order` of the layer for counts[0]; a layer whose
    ranking is shorter than a count leaves the batch at that count, without copies."""
    start: list[tuple[int, Copies | None]] = [(0, None)] * len(weights)
    pending = list(range(len(weights)))
    for extra in counts:
        for index in pending:
            if rankings[index].size < extra:
                start[index] = (extra, None)
        pending = [index for index in pending if rankings[index].size >= extra]
        trial_limits = replica_limits_of if extra else limits_of
        batch = max(1, BATCH_CELLS // (weights.shape[1] * num_gpus))
        fitted = [
            copies for lo in range(0, len(pending), batch)
            for copies in _fitted(weights, rankings, num_gpus, trial_limits, extra, reuses, pending[lo : lo + batch])
        ]
        for index, copies in zip(pending, fitted):
            if copies is not None:
                start[index] = (extra, copies)
        pending = [index for index, copies in zip(pending, fitted) if copies is None]
    return start


def _fitted(
    weights: np.ndarray, rankings: list[np.ndarray], num_gpus: int, limits_of: list[Limits], extra: int, reuses: list[dict], rows: list[int]
) -> list[Copies | None]:
    """`initial_copies` of layers `rows` with `extra` replicas at once, None where they do not fit; packings into reuses."""
    num_rows, num_experts = len(rows), weights.shape[1]
    row = np.arange(num_rows)[:, None]
    ranked = np.stack([rankings[i][:extra] for i in rows]) + row * num_experts  # [P, extra], layer p's experts from p * E
    counts = 1 + np.bincount(ranked.ravel(), minlength=num_rows * num_experts).reshape(num_rows, num_experts)
    expert = np.repeat(np.tile(np.arange(num_experts), num_rows), counts.ravel()).reshape(num_rows, -1)  # [P, E + extra]
    tokens = weights[rows][row, expert] / counts[row, expert]
    limits = [limits_of[i] for i in rows]
    keys = [(lim.smallest_common, lim.budget) for lim in limits]  # what fewest_quantized_copies reads but the sizes
    needed_of = {key: fewest_quantized_copies(expert.shape[1], num_gpus, limits[keys.index(key)]) if extra else 0 for key in set(keys)}
    needed = np.array([needed_of[key] for key in keys])
    fits = np.ones(num_rows, dtype=bool)
    for need in set(needed_of.values()) - {0}:
        some = np.flatnonzero(needed == need)
        least = np.partition(tokens[some], need - 1, axis=1)[:, :need].sum(axis=1)  # per row as initial_copies sums
        fits[some] = ~(least > np.array([limits[j].token_budget for j in some]))
    packed = np.flatnonzero(fits)
    fitted: list[Copies | None] = [None] * num_rows
    if not packed.size:
        return fitted
    fmt_bytes = limits[0].fmt_bytes  # the model's: one for all layers
    budget = np.repeat([limits[j].budget for j in packed.tolist()], num_gpus)  # [F * G]
    gpu = pack_rows_by_rounds(expert[packed], tokens[packed], num_gpus)  # [F, S]
    flat_gpu = (gpu + np.arange(packed.size)[:, None] * num_gpus).ravel()  # layer f's GPU g is f * G + g
    over = np.maximum(np.bincount(flat_gpu, minlength=budget.size) * int(fmt_bytes[0]) - budget, 0)
    cost = np.stack([limits[j].cost for j in packed])[np.arange(packed.size)[:, None], expert[packed]].reshape(-1, 3)
    fmt = cheapest_conversions_by_gpu(flat_gpu, np.zeros(flat_gpu.size, dtype=np.int64), tokens[packed].ravel(), cost, fmt_bytes, over)
    still_over = (np.bincount(flat_gpu, weights=fmt_bytes[fmt], minlength=budget.size) > budget).reshape(packed.size, num_gpus)
    fmt, over = fmt.reshape(gpu.shape), over.reshape(packed.size, num_gpus)
    for f, j in enumerate(packed.tolist()):
        reuses[rows[j]]["packed", extra] = gpu[f], fmt[f], over[f]
        if not still_over[f].any() and not tokens[j][fmt[f] > 0].sum() > limits[j].token_budget:
            fitted[j] = gpu[f], expert[j], fmt[f], tokens[j]
    return fitted
