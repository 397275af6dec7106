"""Optional exact refine of one layer: a HiGHS MILP over copies, formats and token splits.

Variables: x[e,g,f] in {0,1} (a copy of expert e on GPU g in format f), y[e,g,f] >= 0 (its
tokens), T (the largest GPU load). Minimise T (plus a tiny quality-cost tie-break) subject to:
every expert's tokens placed, tokens only on existing copies, at most one copy of an expert per
GPU, 1..max_copies copies per expert, bytes per GPU <= budget, tokens per GPU <= T, quantized
tokens <= the quality budget. The greedy plan is the warm start, so a time-limited solve never
returns anything worse; if HiGHS finds nothing better in time, the greedy plan stands.
"""

from __future__ import annotations

import highspy
import numpy as np

from rnq_ep.balance import quiet_highs
from rnq_ep.planner.limits import Limits
from rnq_ep.planner.transport import Copies

TIE_BREAK = 1e-6  # weight of the quality cost relative to the max load


def refine_layer(copies: Copies, weight: np.ndarray, limits: Limits, num_gpus: int, time_limit: float) -> Copies:
    """Copies (gpu, expert, fmt, tokens) [S] of a MILP-optimal layer, or `copies` if it is not better."""
    num_experts = weight.size
    formats = np.flatnonzero(np.isfinite(limits.cost).all(axis=0))  # allowed format codes
    shape = (num_experts, num_gpus, formats.size)
    n = int(np.prod(shape))
    e, g, f = (a.ravel() for a in np.indices(shape))
    x, y, t = np.arange(n), n + np.arange(n), 2 * n
    cost = limits.cost[e, formats[f]]
    rows, cols, vals, lower, upper = [], [], [], [], []

    def add(row_ids: np.ndarray, col_ids: np.ndarray, coef: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        base = sum(len(b) for b in lower)
        rows.append(base + row_ids)
        cols.append(col_ids)
        vals.append(np.broadcast_to(coef, col_ids.shape).astype(np.float64))
        lower.append(lo)
        upper.append(hi)

    inf = highspy.kHighsInf
    add(e, y, 1.0, weight, weight)  # all tokens of e placed
    add(np.r_[x, x], np.r_[y, x], np.r_[np.ones(n), -weight[e]], np.full(n, -inf), np.zeros(n))  # y <= w x
    pair = e * num_gpus + g
    add(pair, x, 1.0, np.full(num_experts * num_gpus, -inf), np.ones(num_experts * num_gpus))
    add(e, x, 1.0, np.ones(num_experts), np.full(num_experts, float(limits.max_copies)))
    add(g, x, limits.fmt_bytes[formats[f]], np.full(num_gpus, -inf), np.full(num_gpus, float(limits.budget)))
    add(np.r_[g, np.arange(num_gpus)], np.r_[y, np.full(num_gpus, t)], np.r_[np.ones(n), -np.ones(num_gpus)],
        np.full(num_gpus, -inf), np.zeros(num_gpus))
    quantized = np.flatnonzero(formats[f] > 0)
    add(np.zeros(quantized.size, dtype=np.int64), y[quantized], 1.0, np.array([-inf]), np.array([limits.token_budget]))

    greedy_t = np.bincount(copies[0], weights=copies[3], minlength=num_gpus).max()
    scale = TIE_BREAK * max(greedy_t, 1.0) / max(float(np.abs(cost[np.isfinite(cost)]).sum() * weight.max()), 1.0)
    h = _model(2 * n + 1, np.concatenate(rows), np.concatenate(cols), np.concatenate(vals),
               np.concatenate(lower), np.concatenate(upper), np.r_[np.zeros(n), scale * cost, 1.0])
    h.changeColsIntegrality(n, x.astype(np.int32), np.full(n, highspy.HighsVarType.kInteger))
    h.setOptionValue("time_limit", float(time_limit))
    start = np.zeros(2 * n + 1)
    index = (np.asarray(copies[1]) * num_gpus + np.asarray(copies[0])) * formats.size + np.searchsorted(formats, copies[2])
    start[x[index]], start[y[index]], start[t] = 1.0, copies[3], greedy_t
    solution = highspy.HighsSolution()
    solution.col_value = start.tolist()
    h.setSolution(solution)
    h.run()
    values = np.asarray(h.getSolution().col_value)
    if values.size != 2 * n + 1:
        return copies
    chosen = np.flatnonzero(values[x] > 0.5)
    tokens = np.clip(values[y[chosen]], 0.0, None)
    total = np.bincount(e[chosen], weights=tokens, minlength=num_experts)
    tokens = np.where(total[e[chosen]] > 0, tokens * weight[e[chosen]] / np.maximum(total[e[chosen]], 1e-300), tokens)
    refined = g[chosen], e[chosen], formats[f[chosen]], tokens
    quantized_ok = tokens[refined[2] > 0].sum() <= limits.token_budget * (1 + 1e-9) + 1e-9
    if not quantized_ok or np.bincount(refined[0], weights=tokens, minlength=num_gpus).max() >= greedy_t * (1 - 1e-9):
        return copies
    return refined


def _model(num_cols, rows, cols, vals, lower, upper, objective) -> highspy.Highs:
    """A quiet Highs holding the LP relaxation of the refine MILP (rows added in CSR form)."""
    h = quiet_highs()
    binaries = (num_cols - 1) // 2
    col_upper = np.r_[np.ones(binaries), np.full(num_cols - binaries, highspy.kHighsInf)]
    h.addVars(num_cols, np.zeros(num_cols), col_upper)
    h.changeColsCost(num_cols, np.arange(num_cols, dtype=np.int32), objective)
    by_row = np.lexsort((cols, rows))
    starts = np.searchsorted(rows[by_row], np.arange(lower.size)).astype(np.int32)
    h.addRows(lower.size, lower, upper, by_row.size, starts, cols[by_row].astype(np.int32), vals[by_row])
    return h
