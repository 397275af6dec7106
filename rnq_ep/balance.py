"""Splitting each expert's tokens over its copies: least-loaded water-filling, plan shares, LP bound.

One function serves three users: the runtime router (per-step quotas), the metrics ("best split"
balancedness) and the planner (scoring a candidate placement). All pure numpy; deterministic.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from rnq_ep.specs import FORMATS, LayerPlan

FMT_CODE = {fmt: code for code, fmt in enumerate(FORMATS)}  # bf16 0, int8 1, int4 2
MAX_REFINE_PASSES = 8  # re-pour sweeps over replicated experts after the greedy first pass (stop early when stable)


@dataclass(frozen=True)
class SlotTable:
    """Array view of one layer's slots; slot s lives on gpu[s] and serves expert[s]."""

    gpu: np.ndarray  # [S] int64
    expert: np.ndarray  # [S] int64
    fmt: np.ndarray  # [S] int8 codes, see FMT_CODE
    share: np.ndarray  # [S] float64, planned fraction of the expert's tokens
    num_gpus: int
    num_experts: int

    @classmethod
    def from_layer(cls, layer: LayerPlan, num_gpus: int, num_experts: int) -> SlotTable:
        """Table of a LayerPlan's slots, in plan order (by gpu, local index)."""
        slots = layer.slots
        return cls.from_arrays(
            gpu=np.array([s.gpu for s in slots], dtype=np.int64),
            expert=np.array([s.expert for s in slots], dtype=np.int64),
            fmt=np.array([FMT_CODE[s.fmt] for s in slots], dtype=np.int8),
            share=np.array([s.share for s in slots], dtype=np.float64),
            num_gpus=num_gpus,
            num_experts=num_experts,
        )

    @classmethod
    def from_arrays(
        cls,
        gpu: np.ndarray,
        expert: np.ndarray,
        fmt: np.ndarray,
        share: np.ndarray,
        num_gpus: int,
        num_experts: int,
    ) -> SlotTable:
        """Validated table from [S] arrays; every expert must have at least one copy."""
        gpu, expert = np.asarray(gpu, np.int64), np.asarray(expert, np.int64)
        if not (len(gpu) == len(expert) == len(fmt) == len(share)):
            raise ValueError("slot arrays gpu, expert, fmt, share must have the same length")
        if len(gpu) and (gpu.min() < 0 or gpu.max() >= num_gpus):
            raise ValueError(f"slot gpu out of range [0, {num_gpus}): {gpu.min()}..{gpu.max()}")
        if len(expert) and (expert.min() < 0 or expert.max() >= num_experts):
            raise ValueError(f"slot expert out of range [0, {num_experts}): {expert.min()}..{expert.max()}")
        missing = np.setdiff1d(np.arange(num_experts), expert)
        if len(missing):
            raise ValueError(f"experts without any copy: {missing[:10].tolist()}")
        return cls(gpu, expert, np.asarray(fmt, np.int8), np.asarray(share, np.float64), num_gpus, num_experts)

    @property
    def num_slots(self) -> int:
        """Number of physical copies S."""
        return len(self.gpu)

    def copies_of(self) -> list[np.ndarray]:
        """Slot indices of each expert, in slot order: [E] arrays."""
        order = np.argsort(self.expert, kind="stable")
        bounds = np.searchsorted(self.expert[order], np.arange(self.num_experts + 1))
        return [order[bounds[e] : bounds[e + 1]] for e in range(self.num_experts)]

    def copy_count(self) -> np.ndarray:
        """Copies per expert: [E] int64."""
        return np.bincount(self.expert, minlength=self.num_experts)


def gpu_loads(table: SlotTable, quotas: np.ndarray) -> np.ndarray:
    """Tokens per GPU from per-copy quotas: [S] -> [G] float64."""
    return np.bincount(table.gpu, weights=np.asarray(quotas, np.float64), minlength=table.num_gpus)


def share_quotas(table: SlotTable, counts: np.ndarray) -> np.ndarray:
    """Split each expert's count by the planned shares, exactly (largest remainder): [E] -> [S] int64."""
    counts = _check_counts(table, counts)
    ideal = counts[table.expert] * table.share  # [S]
    quotas = np.floor(ideal).astype(np.int64)
    remainder = counts - np.bincount(table.expert, weights=quotas, minlength=table.num_experts).astype(np.int64)
    frac = ideal - quotas
    # per expert, the `remainder[e]` slots with the largest fractional part (ties: slot order) get +1
    order = np.lexsort((np.arange(table.num_slots), -frac, table.expert))
    first = np.searchsorted(table.expert[order], np.arange(table.num_experts))
    rank_in_expert = np.arange(table.num_slots) - first[table.expert[order]]
    bump = rank_in_expert < remainder[table.expert[order]]
    quotas[order[bump]] += 1
    return quotas


def water_fill(table: SlotTable, counts: np.ndarray) -> np.ndarray:
    """Integer tokens per copy that fill the least-loaded GPUs first: [E] -> [S] int64.

    Single-copy experts are fixed; replicated experts are poured heaviest first onto their copies'
    GPUs up to a common water level, then re-poured given everyone else's load until a sweep changes
    nothing (at most MAX_REFINE_PASSES). At equal load bf16 copies win, then lower GPU index.
    Quotas of an expert sum to its count. Loads are exact Python ints and each pour touches a
    handful of copies, where numpy's per-call overhead would dominate; an expert whose GPUs no other
    pour changed since its last pour is skipped (a re-pour would give the same split).
    """
    counts = _check_counts(table, counts)
    copy_count = table.copy_count()
    quotas = np.where(copy_count[table.expert] == 1, counts[table.expert], 0)  # [S]
    multi = np.flatnonzero(copy_count > 1)
    if not len(multi):
        return quotas
    multi = multi[np.argsort(-counts[multi], kind="stable")]
    load = np.bincount(table.gpu, weights=quotas, minlength=table.num_gpus).astype(np.int64).tolist()
    by_tie = tie_order(table)
    first = np.searchsorted(table.expert[by_tie], multi).tolist()
    slots = [by_tie[f : f + c].tolist() for f, c in zip(first, copy_count[multi].tolist())]  # per pour
    gpu_of = table.gpu.tolist()
    gpus = [[gpu_of[s] for s in pour] for pour in slots]
    amounts = counts[multi].tolist()
    touching = [[] for _ in range(table.num_gpus)]  # pours with a copy on GPU g
    for p, on in enumerate(gpus):
        for g in on:
            touching[g].append(p)
    # False where a GPU holds two copies of the expert (EPLB): then all old parts come off before reading levels
    distinct = [len(set(on)) == len(on) for on in gpus]
    pair = [d and len(on) == 2 for d, on in zip(distinct, gpus)]
    dirty = [True] * len(gpus)  # someone changed one of its GPUs since it was last poured
    parts = [[0] * len(on) for on in gpus]
    for _ in range(MAX_REFINE_PASSES + 1):
        changed = False
        for p, (amount, on, old) in enumerate(zip(amounts, gpus, parts)):
            if not dirty[p]:
                continue
            dirty[p] = False
            if pair[p]:  # most pours at small scale: two copies, written out
                g0, g1 = on
                q0_old, q1_old = old
                level0, level1 = load[g0] - q0_old, load[g1] - q1_old
                q0, q1 = _pour_two(amount, level0, level1)
                if q0 == q0_old and q1 == q1_old:
                    continue  # same split, same loads
                load[g0], load[g1] = level0 + q0, level1 + q1
                for other in touching[g0]:
                    dirty[other] = True
                for other in touching[g1]:
                    dirty[other] = True
                dirty[p], parts[p], changed = False, [q0, q1], True
                continue
            if distinct[p]:
                level = [load[g] - q for g, q in zip(on, old)]
                part = _pour(amount, level)
                if part == old:
                    continue  # same split, same loads
                for g, lv, q, q_old in zip(on, level, part, old):
                    if q != q_old:  # else the GPU's load stays
                        load[g] = lv + q
                        for other in touching[g]:
                            dirty[other] = True
            else:
                for g, q in zip(on, old):
                    load[g] -= q
                part = _pour(amount, [load[g] for g in on])
                for g, q, q_old in zip(on, part, old):
                    load[g] += q
                    if q != q_old:
                        for other in touching[g]:
                            dirty[other] = True
            changed = changed or part != old
            dirty[p] = False
            parts[p] = part
        if not changed:
            break
    for pour, part in zip(slots, parts):
        quotas[pour] = part
    return quotas


def tie_order(table: SlotTable) -> np.ndarray:
    """Slots by expert, each expert's in water_fill's tie order (bf16 first, then GPU index, then slot): [S].

    A pour's stable sort by level decides the rest; the device kernel (rnq_ep.kernels.quotas) pours in this
    order too."""
    return np.lexsort((np.arange(table.num_slots), table.gpu, table.fmt, table.expert))


def _pour_two(amount: int, level0: int, level1: int) -> tuple[int, int]:
    """`_pour` over two bins at levels (level0, level1), in closed form."""
    if level0 <= level1:
        if level1 - level0 >= amount:
            return amount, 0
        water, extra = divmod(amount + level0 + level1, 2)
        return water - level0 + extra, water - level1
    if level0 - level1 >= amount:
        return 0, amount
    water, extra = divmod(amount + level0 + level1, 2)
    return water - level0, water - level1 + extra


def _pour(amount: int, level: list[int]) -> list[int]:
    """Integer water-filling of `amount` over bins at `level` (ties: lower index): [c] -> [c] ints summing to amount."""
    n = len(level)
    if n == 2:
        return list(_pour_two(amount, *level))
    order = _order_of_three(*level) if n == 3 else sorted(range(n), key=level.__getitem__)
    # the k lowest bins are filled: the smallest k whose filling up to the next bin's level would reach amount
    below, k = level[order[0]], 1
    for i in order[1:]:
        if k * level[i] - below >= amount:
            break
        below += level[i]
        k += 1
    water, extra = divmod(amount + below, k)  # the first `extra` bins (lowest, then tie order) get one more
    part = [0] * n
    for rank in range(k):
        i = order[rank]
        part[i] = water - level[i] + (rank < extra)
    return part


def _order_of_three(a: int, b: int, c: int) -> tuple[int, int, int]:
    """Indices of three levels ascending, ties by index (a stable argsort), without sorting."""
    if a <= b:
        if b <= c:
            return 0, 1, 2
        return (0, 2, 1) if a <= c else (2, 0, 1)
    if a <= c:
        return 1, 0, 2
    return (1, 2, 0) if b <= c else (2, 1, 0)


def lp_min_max_load(table: SlotTable, counts: np.ndarray, base_load: np.ndarray | None = None) -> float:
    """LP optimum of the largest GPU load over fractional splits of each expert: the bound for water_fill."""
    import highspy

    counts = _check_counts(table, counts).astype(np.float64)
    s, g, e = table.num_slots, table.num_gpus, table.num_experts
    base = np.zeros(g) if base_load is None else np.asarray(base_load, np.float64)
    inf = highspy.kHighsInf
    lp = highspy.HighsLp()
    lp.num_col_ = s + 1  # x_s tokens per copy, then T
    lp.num_row_ = e + g
    lp.col_cost_ = np.r_[np.zeros(s), 1.0]
    lp.col_lower_ = np.zeros(s + 1)
    lp.col_upper_ = np.full(s + 1, inf)
    # rows 0..E-1: sum_{s of e} x_s = counts[e];  rows E..E+G-1: sum_{s on g} x_s - T <= -base[g]
    lp.row_lower_ = np.r_[counts, np.full(g, -inf)]
    lp.row_upper_ = np.r_[counts, -base]
    rows = np.r_[table.expert, e + table.gpu, e + np.arange(g)]
    cols = np.r_[np.arange(s), np.arange(s), np.full(g, s)]
    vals = np.r_[np.ones(2 * s), -np.ones(g)]
    order = np.lexsort((rows, cols))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.searchsorted(cols[order], np.arange(s + 2)).astype(np.int32)
    lp.a_matrix_.index_ = rows[order].astype(np.int32)
    lp.a_matrix_.value_ = vals[order]
    h = quiet_highs()
    h.passModel(lp)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"LP bound did not solve: {h.modelStatusToString(h.getModelStatus())}")
    return float(h.getInfo().objective_function_value)


def quiet_highs():
    """A silent highspy.Highs(); its constructor prints a banner to fd 1, which we swallow."""
    import highspy

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return h


def _check_counts(table: SlotTable, counts: np.ndarray) -> np.ndarray:
    """Counts as int64 [E]; reject wrong shape, negative or non-finite values."""
    arr = np.asarray(counts)
    if arr.shape != (table.num_experts,):
        raise ValueError(f"counts has shape {arr.shape}, expected ({table.num_experts},)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError("counts contain NaN or inf")
    if (arr < 0).any():
        raise ValueError(f"counts must be >= 0, got min {arr.min()}")
    return arr.astype(np.int64)
