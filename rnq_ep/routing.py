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

This is the host reference: the runtime step computes the same quotas and slots on the tokens'
device (`rnq_ep.quotas`, `rnq_ep.layout`), and tests compare the two. The public functions
validate their inputs; the `step_*` ones are their cores for SpillMoE's host plan (LLEP spills
on the host) and `rnq-ep bench step`'s old path, with the table's constants (`SlotIndex`) kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rnq_ep.balance import SlotTable, share_quotas, water_fill

POLICIES = ("least-loaded", "static", "hash")


@dataclass(frozen=True)
class SlotIndex:
    """What routing and dispatch derive from a SlotTable alone: built once per table (per plan switch)."""

    table: SlotTable
    device: torch.device  # where the tensors below live (the tokens' device)
    order: np.ndarray  # [S] slots sorted by (expert, slot)
    first: np.ndarray  # [E] start of each expert's copies in `order`
    copy_index: np.ndarray  # [S] index of each slot among its expert's copies (slot order)
    copies: np.ndarray  # [S] copy count of each slot's expert
    share_problem: str | None  # why static routing cannot use the plan's shares, or None
    on_gpu: np.ndarray  # [S, R] int64 one-hot of each slot's GPU
    order_t: torch.Tensor  # [S] int64 `order` on device
    first_t: torch.Tensor  # [E] int64
    copy_count_t: torch.Tensor  # [E] int64
    gpu_t: torch.Tensor  # [S] int64 each slot's GPU
    local_copy_t: torch.Tensor  # [S] int64 index of each slot among its GPU's slots, in table order


def slot_index(table: SlotTable, device: torch.device | str = "cpu") -> SlotIndex:
    """The per-table constants of routing and dispatch, tensors on `device`."""
    device = torch.device(device)
    order = np.argsort(table.expert, kind="stable")
    copy_count = table.copy_count()
    first = np.cumsum(copy_count) - copy_count
    copy_index = np.empty(table.num_slots, dtype=np.int64)
    copy_index[order] = np.arange(table.num_slots) - first[table.expert[order]]
    share_sum = np.bincount(table.expert, weights=table.share, minlength=table.num_experts)
    off = np.flatnonzero(np.abs(share_sum - 1.0) > 1e-6)
    share_problem = f"shares of expert {off[0]} sum to {share_sum[off[0]]:.6g}, expected 1" if len(off) else None
    by_gpu = np.argsort(table.gpu, kind="stable")
    per_gpu = np.bincount(table.gpu, minlength=table.num_gpus)
    local_copy = np.empty(table.num_slots, dtype=np.int64)
    local_copy[by_gpu] = np.arange(table.num_slots) - (np.cumsum(per_gpu) - per_gpu)[table.gpu[by_gpu]]

    def on_device(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    return SlotIndex(
        table=table, device=device, order=order, first=first, copy_index=copy_index,
        copies=copy_count[table.expert], share_problem=share_problem,
        on_gpu=np.eye(table.num_gpus, dtype=np.int64)[table.gpu],
        order_t=on_device(order), first_t=on_device(first), copy_count_t=on_device(copy_count),
        gpu_t=on_device(table.gpu), local_copy_t=on_device(local_copy),
    )


def copy_quotas(global_counts: torch.Tensor | np.ndarray, table: SlotTable, policy: str = "least-loaded") -> np.ndarray:
    """Tokens per copy for the whole step, all ranks: counts [R, E] -> [S] int64 (exact per expert)."""
    return step_quotas(_check_counts(global_counts, table, policy), slot_index(table), policy)


def step_quotas(counts: np.ndarray, index: SlotIndex, policy: str) -> np.ndarray:
    """copy_quotas of checked counts [R, E] int64 (a policy in POLICIES) with the table's index: -> [S] int64."""
    total = counts.sum(axis=0)  # [R, E] -> [E]
    table = index.table
    if policy == "least-loaded":
        return water_fill(table, total)
    if policy == "static":
        if index.share_problem is not None:
            raise ValueError(f"static routing: {index.share_problem}")
        return share_quotas(table, total)
    return residues_below(total[table.expert], index.copy_index, index.copies)


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
    index = slot_index(table)
    quotas = step_quotas(counts, index, policy) if quotas is None else quotas
    return step_rank_copy_counts(counts, index, policy, quotas)


def step_rank_copy_counts(counts: np.ndarray, index: SlotIndex, policy: str, quotas: np.ndarray) -> np.ndarray:
    """rank_copy_counts of checked counts [R, E] and their quotas [S]: -> [R, S] int64."""
    expert = index.table.expert
    offsets = np.cumsum(counts, axis=0) - counts  # [R, E] start of rank r's part of e's order
    lo = offsets[:, expert]  # [R, S]
    hi = lo + counts[:, expert]
    if policy == "hash":
        return residues_below(hi, index.copy_index, index.copies) - residues_below(lo, index.copy_index, index.copies)
    start = _copy_starts(index, quotas)  # [S] within the expert's order
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
    flat = topk_ids.reshape(-1).long()  # [T, k] -> [T*k]
    local = torch.bincount(flat, minlength=table.num_experts)  # [E]
    if not torch.equal(local.cpu(), torch.from_numpy(counts[rank])):
        raise ValueError(f"global_counts[{rank}] does not match rank {rank}'s topk_ids counts")
    index = slot_index(table, topk_ids.device)
    quotas = step_quotas(counts, index, policy) if quotas is None else quotas
    return step_route(counts, index, flat, local, rank, policy, quotas).reshape(topk_ids.shape)


def step_route(
    counts: np.ndarray,
    index: SlotIndex,
    flat_ids: torch.Tensor,
    local_counts: torch.Tensor,
    rank: int,
    policy: str,
    quotas: np.ndarray,
) -> torch.Tensor:
    """route's core for checked inputs: flat_ids [A] int64 with bincount local_counts [E] (= counts[rank]) -> slots [A]."""
    device = flat_ids.device
    # position of each assignment in its expert's rank-major order
    by_expert = torch.argsort(flat_ids, stable=True)  # assignments grouped by expert, token order within
    local_start = torch.cumsum(local_counts, 0) - local_counts  # [E]
    pos = torch.empty_like(flat_ids)
    pos[by_expert] = torch.arange(len(flat_ids), device=device) - local_start[flat_ids[by_expert]]
    offsets = np.cumsum(counts, axis=0)[rank] - counts[rank]  # [E] sum of lower ranks' counts
    pos += torch.from_numpy(offsets).to(device)[flat_ids]
    if policy == "hash":
        at = index.first_t[flat_ids] + pos % index.copy_count_t[flat_ids]
        return index.order_t[at]
    # copies in (expert, slot) order tile one key line: expert e's range starts at sum(counts[:e])
    ordered = quotas[index.order]
    key_start = torch.from_numpy(np.cumsum(ordered) - ordered).to(device)  # [S]
    total = counts.sum(axis=0)
    expert_start = torch.from_numpy(np.cumsum(total) - total).to(device)  # [E]
    at = torch.searchsorted(key_start, expert_start[flat_ids] + pos, right=True) - 1
    return index.order_t[at]


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError naming the first expert id outside [0, num_experts): topk_ids [T, k]."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, k], got shape {tuple(topk_ids.shape)}")
    if not topk_ids.numel():
        return
    low, high = torch.aminmax(topk_ids)
    if low < 0 or high >= num_experts:
        bad = topk_ids[(topk_ids < 0) | (topk_ids >= num_experts)]
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


def residues_below(limit: np.ndarray, copy_index: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """How many p in [0, limit) have p mod copies == copy_index (elementwise, broadcast; numpy or torch ints)."""
    return (limit - copy_index + copies - 1) // copies


def _copy_starts(index: SlotIndex, quotas: np.ndarray) -> np.ndarray:
    """Start of each copy's contiguous range within its expert's order: quotas [S] -> [S]."""
    order, first, expert = index.order, index.first, index.table.expert
    before = np.cumsum(quotas[order]) - quotas[order]  # over all copies in (expert, slot) order
    start = np.empty(len(order), dtype=np.int64)
    start[order] = before - before[first[expert[order]]]
    return start
