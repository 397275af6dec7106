"""`balance.water_fill` of many independent layers at once: the layers' pours run side by side, numpy over
the layer axis, so a plan's router check costs a few numpy calls per pour index instead of Python per pour.

The quotas are water_fill's exactly: the same pours in the same order (heaviest expert first, sweeps up to
MAX_REFINE_PASSES + 1, a layer's sweeps stop changing it once one sweep changed nothing), the same integer
pour with the same ties (bf16 copies, then lower GPU, fill first). Where water_fill skips a pour whose GPUs
nobody changed, this one re-pours it, which gives the same split. A layer with two copies of an expert on
one GPU (EPLB), or with 2**39 tokens or more, goes to water_fill itself.
"""

from __future__ import annotations

import numpy as np

from rnq_ep.balance import MAX_REFINE_PASSES, SlotTable, _check_counts, water_fill

FULL = 2**40  # level of a padding bin: never filled while a layer's tokens stay below FULL / 2 (C * FULL fits int64)


def water_fill_layers(tables: list[SlotTable], counts: list[np.ndarray]) -> list[np.ndarray]:
    """water_fill(tables[l], counts[l]) for every layer l: [L] tables and [L] x [E_l] counts -> [L] x [S_l] int64."""
    quotas: list[np.ndarray | None] = [None] * len(tables)
    pours = []  # (layer, replicated experts' slots, their pour (heaviest expert first), bin in it, amounts)
    for index, (table, count) in enumerate(zip(tables, counts)):
        count = _check_counts(table, count)  # int64 [E]; bad shape, NaN or negative counts raise as in water_fill
        copy_count = table.copy_count()
        multi = np.flatnonzero(copy_count > 1)
        if not len(multi) or _shares_a_gpu(table) or 2 * int(count.sum()) >= FULL:
            quotas[index] = water_fill(table, count)
            continue
        quotas[index] = np.where(copy_count[table.expert] == 1, count[table.expert], 0)
        multi = multi[np.argsort(-count[multi], kind="stable")]
        pour_of = np.empty(table.num_experts, dtype=np.int64)
        pour_of[multi] = np.arange(multi.size)
        by_tie = np.lexsort((np.arange(table.num_slots), table.gpu, table.fmt, table.expert))
        slots = by_tie[copy_count[table.expert[by_tie]] > 1]  # by expert, each in tie order
        experts = table.expert[slots]
        bins = np.arange(slots.size) - np.searchsorted(experts, experts)
        pours.append((index, slots, pour_of[experts], bins, count[multi]))
    if pours:
        _pour_side_by_side(tables, quotas, pours)
    return quotas  # type: ignore[return-value]


def _shares_a_gpu(table: SlotTable) -> bool:
    """True when some GPU holds two copies of one expert."""
    return np.unique(table.expert * table.num_gpus + table.gpu).size < table.num_slots


def _pour_side_by_side(tables: list[SlotTable], quotas: list, pours: list) -> None:
    """Run the sweeps of every layer in `pours` together and write their replicated experts' quotas (in place);
    a layer whose sweep changed nothing is final and leaves the batch."""
    num_layers = len(pours)
    bins = max(int(bin_of.max()) for *_, bin_of, _ in pours) + 2  # at least one padding bin per pour
    num_gpus = max(tables[index].num_gpus for index, *_ in pours)
    num_pours = np.array([amounts.size for *_, amounts in pours])
    amount = np.zeros((num_layers, num_pours.max()), dtype=np.int64)
    load = np.zeros((num_layers, num_gpus + 1), dtype=np.int64)
    load[:, num_gpus] = FULL  # the padding bins' GPU: its level stays FULL as they never fill
    gpu = np.full((num_layers, num_pours.max(), bins), num_gpus, dtype=np.int64)
    for row, (index, slots, pour_of, bin_of, amounts) in enumerate(pours):
        table = tables[index]
        load[row, : table.num_gpus] = np.bincount(table.gpu, weights=quotas[index], minlength=table.num_gpus)
        amount[row, : amounts.size] = amounts
        gpu[row, pour_of, bin_of] = table.gpu[slots]
    parts = np.zeros_like(gpu)
    final = parts.copy()
    alive = np.arange(num_layers)  # rows of the layers still sweeping
    rank = np.arange(bins)
    steps = np.arange(1, bins)
    for _ in range(MAX_REFINE_PASSES + 1):
        rows = np.arange(alive.size)
        flat_load = load.ravel()  # a view: flat indices below read and write `load`
        on_flat = gpu + rows[:, None, None] * (num_gpus + 1)
        bin_base = rows[:, None] * bins  # flat index of each layer's first bin
        last = rows * bins - 1  # + k: flat index of the k-th lowest bin
        before = parts.copy()
        for p in range(num_pours[alive].max()):
            on = on_flat[:, p]
            level = flat_load[on] - parts[:, p]
            order = np.argsort(level, axis=1, kind="stable") + bin_base
            lv = level.ravel()[order]
            below = np.cumsum(lv, axis=1)  # below[:, i]: the i + 1 lowest bins
            # the k lowest bins are filled: the smallest k whose filling up to the next bin's level reaches
            # amount (a padding bin always does)
            k = (steps * lv[:, 1:] - below[:, :-1] >= amount[:, p, None]).argmax(axis=1) + 1
            water, extra = np.divmod(amount[:, p] + below.ravel()[last + k], k)
            part = np.empty_like(level)
            part.ravel()[order] = np.where(rank < k[:, None], water[:, None] - lv + (rank < extra[:, None]), 0)
            flat_load[on] = level + part
            parts[:, p] = part
        final[alive] = parts
        moved = (parts != before).any(axis=(1, 2))  # each pour runs once a sweep: a changed split shows here
        if not moved.all():
            alive, parts, load, gpu, amount = alive[moved], parts[moved], load[moved], gpu[moved], amount[moved]
        if not alive.size:
            break
    for row, (index, slots, pour_of, bin_of, _) in enumerate(pours):
        quotas[index][slots] = final[row, pour_of, bin_of]
