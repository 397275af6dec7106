"""Keep the quality budget for what the router does: least-loaded routing (`balance.water_fill`) ignores
the planned shares, so on the planning loads it can send more tokens to quantized copies than planned.

Only experts with both bf16 and quantized copies ("mixed") can route more to quantized copies than
planned: an expert whose copies are all quantized serves all its tokens quantized under any split,
and one with only bf16 copies none. So when the mixed experts' tokens cannot push the total over the
budget, nothing is routed; otherwise water_fill tells. `rnq.py` first re-plans a layer that is over
with a smaller budget; `drop_until_within` is the last resort: drop the quantized copies of mixed
experts that the router fills most (their tokens go to the expert's other copies). Without mixed
experts the routed quantized tokens equal the planned ones, which the planner kept within the
budget, so it ends.
"""

from __future__ import annotations

import numpy as np

from rnq_ep.balance import SlotTable, water_fill
from rnq_ep.planner.transport import Copies
from rnq_ep.planner.water_layers import water_fill_layers


def routed_quantized(table: SlotTable, counts: np.ndarray, token_budget: float) -> tuple[float, np.ndarray | None]:
    """(quantized tokens under water_fill of counts [E], quotas [S]), or (a bound <= token_budget, None)
    when the mixed experts' tokens cannot exceed the budget."""
    quantized = np.bincount(table.expert, weights=table.fmt > 0, minlength=counts.size)
    bound = float(counts[quantized > 0].sum())
    if bound <= token_budget:
        return bound, None
    quotas = water_fill(table, counts)
    return float(quotas[table.fmt > 0].sum()), quotas


def routed_quantized_layers(tables: list[SlotTable], counts: list[np.ndarray], token_budgets: list[float]) -> list[float]:
    """`routed_quantized` of every layer ([L] tables, [L] x [E] counts, [L] budgets) -> [L] tokens; the layers
    that need water_fill run it side by side (`water_layers.py`, the same quotas)."""
    routed, pending = [], []
    for index, (table, count, token_budget) in enumerate(zip(tables, counts, token_budgets)):
        quantized = np.bincount(table.expert, weights=table.fmt > 0, minlength=count.size)
        routed.append(float(count[quantized > 0].sum()))
        if routed[-1] > token_budget:
            pending.append(index)
    quotas = water_fill_layers([tables[i] for i in pending], [counts[i] for i in pending])
    for index, quota in zip(pending, quotas):
        routed[index] = float(quota[tables[index].fmt > 0].sum())
    return routed


def drop_until_within(copies: Copies, counts: np.ndarray, token_budget: float, num_gpus: int) -> Copies:
    """Copies (gpu, expert, fmt, tokens) [S] whose water_fill split of counts [E] keeps quantized tokens
    <= token_budget; when copies had to go, tokens become that split, else they stay as planned."""
    table = table_of(copies, num_gpus, counts.size)
    dropped = False
    while True:
        routed, quotas = routed_quantized(table, counts, token_budget)
        quantized = np.bincount(table.expert, weights=table.fmt > 0, minlength=counts.size)
        mixed = (quantized > 0) & (quantized < table.copy_count())
        candidates = np.flatnonzero((table.fmt > 0) & mixed[table.expert] & (quotas > 0)) if quotas is not None else []
        if routed <= token_budget or len(candidates) == 0:
            break
        candidates = candidates[np.argsort(-quotas[candidates], kind="stable")]
        _, first = np.unique(table.expert[candidates], return_index=True)  # one copy per expert and round
        candidates = candidates[np.sort(first)]
        keep = np.ones(table.num_slots, dtype=bool)
        keep[candidates[: int(np.searchsorted(np.cumsum(quotas[candidates]), routed - token_budget)) + 1]] = False
        table = SlotTable(table.gpu[keep], table.expert[keep], table.fmt[keep], table.share[keep], num_gpus, counts.size)
        dropped = True
    if not dropped:
        return copies
    quotas = water_fill(table, counts) if quotas is None else quotas
    return table.gpu, table.expert, table.fmt.astype(np.int64), quotas.astype(np.float64)


def table_of(copies: Copies, num_gpus: int, num_experts: int) -> SlotTable:
    """SlotTable of copies (gpu, expert, fmt, tokens) [S]; tokens stand in for shares (water_fill ignores them)."""
    gpu, expert, fmt, tokens = copies
    return SlotTable(gpu, expert, fmt.astype(np.int8), tokens, num_gpus, num_experts)
