"""Run-time routing: the copy of its expert that each (token, k) of this rank goes to (pure).

Every rank holds the same global per-expert counts [R, E] (one all-gather per step), so every
rank computes the same per-copy quotas and, from them, the copies of its own tokens with no
further exchange. Expert e's (token, k) assignments are ordered rank-major: rank 0's in token
order, then rank 1's, and so on; rank r's part starts at the sum of lower ranks' counts[:, e].

Policies:
- `least-loaded` (default): quotas by water-filling GPU loads over the whole layer; copy c of e
  takes the contiguous range [start_c, start_c + quota_c) of e's order, e's copies in slot order.
- `static`: quotas by the plan's shares, same contiguous mapping.
- `hash`: copy = position in e's order mod e's copy count. vLLM takes a token's position mod the
  replica count; taking it over the global rank-major order keeps it deterministic and lets the
  quotas (and so the all-to-all sizes) follow from counts alone. Load-blind, an even split.
"""

from __future__ import annotations

import numpy as np
import torch

from rnq_ep.balance import SlotTable, share_quotas, water_fill

POLICIES = ("least-loaded", "static", "hash")


def copy_quotas(global_counts: torch.Tensor | np.ndarray, table: SlotTable, policy: str = "least-loaded") -> np.ndarray:
    """Tokens per copy for the whole step, all ranks: counts [R, E] -> [S] int64 (exact per expert)."""
    total = _check_counts(global_counts, table, policy).sum(axis=0)  # [R, E] -> [E]
    if policy == "least-loaded":
        return water_fill(table, total)
    if policy == "static":
        share_sum = np.bincount(table.expert, weights=table.share, minlength=table.num_experts)
        off = np.flatnonzero(np.abs(share_sum - 1.0) > 1e-6)
        if len(off):
            raise ValueError(f"static routing: shares of expert {off[0]} sum to {share_sum[off[0]]:.6g}, expected 1")
        return share_quotas(table, total)
    index, copies = _copy_index(table)
    return _residues_below(total[table.expert], index, copies)


def rank_copy_counts(
    global_counts: torch.Tensor | np.ndarray,
    table: SlotTable,
    policy: str = "least-loaded",
    quotas: np.ndarray | None = None,
) -> np.ndarray:
    """(token, k) assignments each rank sends to each copy: counts [R, E] -> [R, S] int64.

    `quotas`: copy_quotas of the same counts and policy when the caller has them already.
    """
    counts = _check_counts(global_counts, table, policy)
    offsets = np.cumsum(counts, axis=0) - counts  # [R, E] start of rank r's part of e's order
    lo = offsets[:, table.expert]  # [R, S]
    hi = lo + counts[:, table.expert]
    if policy == "hash":
        index, copies = _copy_index(table)
        return _residues_below(hi, index, copies) - _residues_below(lo, index, copies)
    quotas = copy_quotas(counts, table, policy) if quotas is None else quotas
    start = _copy_starts(table, quotas)  # [S] within the expert's order
    return np.clip(np.minimum(hi, start + quotas) - np.maximum(lo, start), 0, None)


def route(
    global_counts: torch.Tensor | np.ndarray,
    table: SlotTable,
    topk_ids: torch.Tensor,
    rank: int,
    policy: str = "least-loaded",
    quotas: np.ndarray | None = None,
) -> torch.Tensor:
    """Slot (index into `table`) of every (token, k) of this rank: topk_ids [T, k] -> [T, k] int64.

    `quotas`: copy_quotas of the same counts and policy when the caller has them already.
    """
    counts = _check_counts(global_counts, table, policy)
    if not 0 <= rank < counts.shape[0]:
        raise ValueError(f"rank {rank} out of range for global counts of {counts.shape[0]} ranks")
    check_topk_ids(topk_ids, table.num_experts)
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long()  # [T, k] -> [T*k]
    local = torch.bincount(flat, minlength=table.num_experts)  # [E]
    if not torch.equal(local.cpu(), torch.from_numpy(counts[rank])):
        raise ValueError(f"global_counts[{rank}] does not match rank {rank}'s topk_ids counts")
    # position of each assignment in its expert's rank-major order
    by_expert = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order within
    local_start = torch.cumsum(local, 0) - local  # [E]
    pos = torch.empty_like(flat)
    pos[by_expert] = torch.arange(len(flat), device=device) - local_start[flat[by_expert]]
    offsets = np.cumsum(counts, axis=0)[rank] - counts[rank]  # [E] sum of lower ranks' counts
    pos += torch.from_numpy(offsets).to(device)[flat]
    order, first = _slots_by_expert(table)
    if policy == "hash":
        copies = torch.from_numpy(table.copy_count()).to(device)
        at = torch.from_numpy(first).to(device)[flat] + pos % copies[flat]
        return torch.from_numpy(order).to(device)[at].reshape(topk_ids.shape)
    quotas = copy_quotas(counts, table, policy) if quotas is None else quotas
    # copies in (expert, slot) order tile one key line: expert e's range starts at sum(counts[:e])
    key_start = torch.from_numpy(np.cumsum(quotas[order]) - quotas[order]).to(device)  # [S]
    total = counts.sum(axis=0)
    expert_start = torch.from_numpy(np.cumsum(total) - total).to(device)  # [E]
    at = torch.searchsorted(key_start, expert_start[flat] + pos, right=True) - 1
    return torch.from_numpy(order).to(device)[at].reshape(topk_ids.shape)


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError naming the first expert id outside [0, num_experts): topk_ids [T, k]."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, k], got shape {tuple(topk_ids.shape)}")
    bad = topk_ids[(topk_ids < 0) | (topk_ids >= num_experts)]
    if bad.numel():
        raise ValueError(f"topk_ids: expert id {int(bad[0])} out of range for {num_experts} experts")


def _check_counts(global_counts: torch.Tensor | np.ndarray, table: SlotTable, policy: str) -> np.ndarray:
    """Global counts as int64 numpy [R, E]; reject wrong shape, negative counts or an unknown policy."""
    if policy not in POLICIES:
        raise ValueError(f"routing policy {policy!r}: expected one of {POLICIES}")
    if isinstance(global_counts, torch.Tensor):
        global_counts = global_counts.detach().cpu().numpy()
    counts = np.asarray(global_counts)
    if counts.ndim != 2 or counts.shape[1] != table.num_experts:
        raise ValueError(f"global_counts has shape {counts.shape}, expected (ranks, {table.num_experts})")
    if (counts < 0).any():
        raise ValueError(f"global_counts must be >= 0, got min {counts.min()}")
    return counts.astype(np.int64)


def _slots_by_expert(table: SlotTable) -> tuple[np.ndarray, np.ndarray]:
    """Slots sorted by (expert, slot) [S], and where each expert's copies start in that order [E]."""
    order = np.argsort(table.expert, kind="stable")
    return order, np.cumsum(table.copy_count()) - table.copy_count()


def _copy_index(table: SlotTable) -> tuple[np.ndarray, np.ndarray]:
    """Each slot's index among its expert's copies (slot order) and its expert's copy count: [S], [S]."""
    order, first = _slots_by_expert(table)
    index = np.empty(table.num_slots, dtype=np.int64)
    index[order] = np.arange(table.num_slots) - first[table.expert[order]]
    return index, table.copy_count()[table.expert]


def _residues_below(limit: np.ndarray, index: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """How many p in [0, limit) have p mod copies == index (elementwise, broadcast)."""
    return (limit - index + copies - 1) // copies


def _copy_starts(table: SlotTable, quotas: np.ndarray) -> np.ndarray:
    """Start of each copy's contiguous range within its expert's order: quotas [S] -> [S]."""
    order, first = _slots_by_expert(table)
    before = np.cumsum(quotas[order]) - quotas[order]  # over all copies in (expert, slot) order
    start = np.empty(table.num_slots, dtype=np.int64)
    start[order] = before - before[first[table.expert[order]]]
    return start
