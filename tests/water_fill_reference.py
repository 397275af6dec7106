"""The dumb twin of `balance.water_fill`: the same sweeps written plainly on floats, for oracle tests.

This is the router's quota function as it was before the fast path (per-expert float pours,
re-poured every sweep); `balance.water_fill` must return exactly the same integer quotas.
"""

from __future__ import annotations

import math

import numpy as np

from rnq_ep.balance import MAX_REFINE_PASSES, SlotTable, gpu_loads


def water_fill_reference(table: SlotTable, counts: np.ndarray) -> np.ndarray:
    """Integer tokens per copy that fill the least-loaded GPUs first: [E] -> [S] int64 (slow, obvious)."""
    counts = np.asarray(counts, dtype=np.int64)
    copy_count = table.copy_count()
    quotas = np.zeros(table.num_slots, dtype=np.int64)
    single = copy_count[table.expert] == 1
    quotas[single] = counts[table.expert[single]]
    load = gpu_loads(table, quotas).tolist()
    multi = np.flatnonzero(copy_count > 1)
    multi = multi[np.argsort(-counts[multi], kind="stable")].tolist()
    copies = table.copies_of()
    parts = {e: [0] * len(copies[e]) for e in multi}
    for _ in range(MAX_REFINE_PASSES + 1):
        changed = False
        for e in multi:
            slots = copies[e].tolist()
            gpus = [int(table.gpu[s]) for s in slots]
            for g, q in zip(gpus, parts[e]):
                load[g] -= q
            part = _pour(int(counts[e]), [load[g] for g in gpus], [int(table.fmt[s]) for s in slots], gpus)
            for g, q in zip(gpus, part):
                load[g] += q
            changed |= part != parts[e]
            parts[e] = part
        if not changed:
            break
    for e in multi:
        quotas[copies[e]] = parts[e]
    return quotas


def _pour(amount: int, level: list[float], fmt: list[int], gpu: list[int]) -> list[int]:
    """Integer water-filling of `amount` over bins at `level`: [c] -> [c] ints summing to amount."""
    order = sorted(range(len(level)), key=lambda i: (level[i], fmt[i], gpu[i]))  # lowest, bf16, gpu
    lv = [level[i] for i in order]
    j, fill = len(lv) - 1, 0.0
    for i in range(len(lv) - 1):
        fill += (i + 1) * (lv[i + 1] - lv[i])
        if fill >= amount:
            j = i
            break
    water = (amount + sum(lv[: j + 1])) / (j + 1)
    part_sorted = [max(math.floor(water - lv[i]), 0) for i in range(j + 1)] + [0] * (len(lv) - j - 1)
    left = amount - sum(part_sorted)
    if left:
        for i in sorted(range(j + 1), key=lambda i: (lv[i] + part_sorted[i], i))[:left]:
            part_sorted[i] += 1
    part = [0] * len(lv)
    for i, slot in enumerate(order):
        part[slot] = part_sorted[i]
    return part
