"""Decide a layer step on the tokens' device: per-copy quotas, each (token, k)'s copy and send row.

DeepEP's shape: `step_layout` computes, from topk_ids and the all-gathered per-expert counts,
everything the step's data movement needs (`StepLayout`); `rnq_ep.dispatch` only moves data.
Every op here has a static output shape (no nonzero, unique, bincount or host reads), so the
layout traces whole under torch.compile and can be captured in a CUDA graph.

Routing semantics are `rnq_ep.routing`'s (the host reference): expert e's (token, k) are ordered
rank-major, rank r's in token order; copy c of e takes the contiguous range of its quota.
Dedupe: a token travels once per destination GPU; its k entries ride along as (local copy,
weight) pairs in its row's metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rnq_ep.quotas import RouteTable, policy_quotas
from rnq_ep.routing import residues_below

TRANSPORTS = ("auto", "exact", "capacity")
CAPACITY_MAX_TOKENS = 256  # auto: capacity up to this many tokens per rank in graphed steps (EPMoE._transport)
CAPACITY_FACTOR = 2.0  # capacity buffers hold this many times the rows of a perfectly even step
ROW_ALIGN = 8  # capacities are rounded up to a multiple of this many rows


@dataclass(frozen=True)
class Capacity:
    """Fixed buffer sizes of the `capacity` transport, from the batch size alone (identical on every rank)."""

    peer_rows: int  # unique token rows one rank may send to one peer
    expert_rows: int  # (token, k) entries one rank may receive for its copies


def capacity_for(tokens: int, top_k: int, num_gpus: int, factor: float = CAPACITY_FACTOR) -> Capacity:
    """Capacity of a step of `tokens` tokens per rank: factor x the even share, capped by what can ever arrive."""
    even_rows = math.ceil(factor * tokens * top_k / num_gpus)
    peer = min(tokens, _aligned(even_rows))  # a token goes at most once to a peer
    expert = min(num_gpus * peer * top_k, _aligned(math.ceil(factor * tokens * top_k)))
    return Capacity(peer_rows=peer, expert_rows=expert)


@dataclass(frozen=True)
class StepLayout:
    """One layer step's decisions, all on the tokens' device; T tokens, k per token, R ranks, S slots."""

    transport: str  # "exact" or "capacity"
    counts: torch.Tensor  # [R, E] int64 every rank's (token, k) per expert
    quotas: torch.Tensor  # [S] int64 (token, k) each copy serves, whole step
    slots: torch.Tensor  # [T, k] int64 slot of each (token, k)
    tokens_per_gpu: torch.Tensor  # [R] int64 (token, k) each GPU serves
    row_token: torch.Tensor  # token of each send row, grouped by destination: exact [A], the first U valid;
    # capacity [R * cap], T for an empty row
    send_index: torch.Tensor  # [T, k] int64 send row of each (token, k); capacity: R*cap = dropped
    send_rows: torch.Tensor  # [R] int64 unique rows this rank sends to each rank
    meta_copy: torch.Tensor  # [T, k] int32 each (token, k)'s local copy on its destination
    health: torch.Tensor  # [R, 2] int64 per rank: bad inputs (out-of-range ids, +1 for bad shapes), first bad id
    overflow: torch.Tensor  # [] bool: capacity exceeded somewhere (or a bad input): redo with `exact`
    capacity: Capacity | None  # capacity transport's buffer sizes, None for exact


def local_counts(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Static-shape counts of this rank's routing: topk_ids [T, k] -> (ids [T*k] clamped into range, per-expert
    counts [E] int64, health [2] int64 = (out-of-range ids, the first of them or 0))."""
    flat = topk_ids.reshape(-1).long()  # [T, k] -> [A]
    out = (flat < 0) | (flat >= num_experts)
    first_bad = flat.gather(0, torch.argmax(out.int(), dim=0, keepdim=True)) if flat.numel() else flat.new_zeros(1)
    health = torch.cat([out.sum().reshape(1), torch.where(out.any(), first_bad, 0)])  # [2]
    flat = flat.clamp(0, num_experts - 1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return flat, counts.scatter_add_(0, flat, torch.ones_like(flat)), health


def step_layout(
    topk_ids: torch.Tensor,
    flat_ids: torch.Tensor,
    gathered: torch.Tensor,
    route: RouteTable,
    transport: str,
    capacity: Capacity | None,
) -> StepLayout:
    """The layout of one step: topk_ids [T, k], flat_ids [A] (local_counts), gathered [R, E + 2] (counts, health)."""
    num_tokens, top_k = topk_ids.shape
    num_experts, rank = route.num_experts, route.rank
    counts, health = gathered[:, :num_experts], gathered[:, num_experts:]  # [R, E], [R, 2]
    total = counts.sum(0)  # [E]
    quotas = policy_quotas(total, route)  # [S]
    starts = None if route.policy == "hash" else _copy_starts(quotas, total, route)
    slots = route_slots(flat_ids, counts, starts, route).reshape(num_tokens, top_k)  # [A] -> [T, k]
    tokens_per_gpu = torch.zeros(route.num_gpus, dtype=torch.int64, device=quotas.device)
    tokens_per_gpu.scatter_add_(0, route.slot_gpu, quotas)
    dest = route.slot_gpu[slots]  # [T, k]
    row_token, send_index, send_rows = _send_rows(dest, route.num_gpus, capacity)
    overflow = health[:, 0].sum() > 0
    if capacity is not None:
        overflow = overflow | (tokens_per_gpu.max() > capacity.expert_rows)
        tokens = counts.sum(1, keepdim=True) // top_k  # [R, 1] a token is a row at most once per peer
        rows_bound = torch.minimum(_entries_between_ranks(counts, quotas, starts, route), tokens)  # [R, R]
        overflow = overflow | (rows_bound.max() > capacity.peer_rows)
    return StepLayout(
        transport="exact" if capacity is None else "capacity",
        counts=counts, quotas=quotas, slots=slots, tokens_per_gpu=tokens_per_gpu, row_token=row_token,
        send_index=send_index, send_rows=send_rows, meta_copy=route.slot_local[slots].int(),
        health=health, overflow=overflow, capacity=capacity,
    )


def route_slots(
    flat_ids: torch.Tensor, counts: torch.Tensor, starts: tuple[torch.Tensor, torch.Tensor] | None, route: RouteTable
) -> torch.Tensor:
    """Slot of each of this rank's (token, k): flat_ids [A], counts [R, E], the quotas' _copy_starts (None for
    hash) -> [A] int64."""
    rank, device = route.rank, flat_ids.device
    num = flat_ids.shape[0]
    by_expert = torch.argsort(flat_ids, stable=True)  # [A] grouped by expert, token order within
    mine = counts[rank]  # [E]
    local_start = torch.cumsum(mine, 0) - mine  # [E]
    pos = torch.empty_like(flat_ids)
    pos[by_expert] = torch.arange(num, device=device) - local_start[flat_ids[by_expert]]
    pos = pos + (counts[:rank].sum(0))[flat_ids]  # lower ranks' part of e's order comes first
    if route.policy == "hash":
        at = route.first[flat_ids] + pos % route.copy_count[flat_ids]
        return route.order[at]
    key_start, expert_start = starts
    at = torch.searchsorted(key_start, expert_start[flat_ids] + pos, right=True) - 1
    return route.order[at]


def _copy_starts(quotas: torch.Tensor, total: torch.Tensor, route: RouteTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies in (expert, slot) order tile one key line: (start of each copy's range on it [S] in that order,
    start of each expert's [E])."""
    ordered = quotas[route.order]
    return torch.cumsum(ordered, 0) - ordered, torch.cumsum(total, 0) - total


def _send_rows(
    dest: torch.Tensor, num_gpus: int, capacity: Capacity | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per unique (destination, token), grouped by destination in token order: dest [T, k] ->
    (token of each sorted entry [A], send row of each (token, k) [T, k], unique rows per destination [R])."""
    num_tokens, top_k = dest.shape
    device = dest.device
    same = dest[:, :, None] == dest[:, None, :]  # [T, k, k]: entry i of the token goes where entry j goes
    first_of = torch.argmax(same.int(), dim=2)  # [T, k] first entry with the same destination
    is_first = first_of == torch.arange(top_k, device=device)  # [T, k]
    token = torch.arange(num_tokens, device=device)[:, None].expand(num_tokens, top_k)  # [T, k]
    key = torch.where(is_first, dest * num_tokens + token, num_gpus * num_tokens).reshape(-1)  # [A], repeats last
    order = torch.argsort(key, stable=True)  # [A]
    position = torch.empty_like(order)
    position[order] = torch.arange(order.shape[0], device=device)
    send_rows = torch.zeros(num_gpus, dtype=torch.int64, device=device)
    send_rows.scatter_add_(0, dest.reshape(-1), is_first.reshape(-1).long())
    row = torch.gather(position.reshape(num_tokens, top_k), 1, first_of)  # [T, k] its first entry's sorted position
    if capacity is None:
        return order // top_k, row, send_rows
    # row within the destination's block, placed at dest * cap; past cap: dropped (written to row R * cap)
    in_block = row - (torch.cumsum(send_rows, 0) - send_rows)[dest]
    cap = capacity.peer_rows
    row = torch.where(in_block < cap, dest * cap + in_block, num_gpus * cap)
    row_token = torch.full((num_gpus * cap + 1,), num_tokens, dtype=torch.int64, device=device)
    row_token.scatter_(0, row.reshape(-1), token.reshape(-1))  # a token's entries to one peer share its row
    return row_token[: num_gpus * cap], row, send_rows


def _entries_between_ranks(
    counts: torch.Tensor, quotas: torch.Tensor, starts: tuple[torch.Tensor, torch.Tensor] | None, route: RouteTable
) -> torch.Tensor:
    """(token, k) each rank sends to each rank (an upper bound on unique rows): counts [R, E], quotas [S] and their
    _copy_starts -> [R, R]."""
    num_gpus = route.num_gpus
    expert = route.slot_expert
    offsets = torch.cumsum(counts, 0) - counts  # [R, E] start of rank r's part of e's order
    lo = offsets[:, expert]  # [R, S]
    hi = lo + counts[:, expert]
    if route.policy == "hash":
        copies = route.copy_count[expert]
        per_slot = residues_below(hi, route.copy_index, copies) - residues_below(lo, route.copy_index, copies)
    else:
        key_start, expert_start = starts
        start = torch.empty_like(key_start)
        start[route.order] = key_start - expert_start[expert[route.order]]  # [S] within the expert's order
        per_slot = (torch.minimum(hi, start + quotas) - torch.maximum(lo, start)).clamp(min=0)  # [R, S]
    out = torch.zeros(counts.shape[0], num_gpus, dtype=torch.int64, device=counts.device)
    return out.index_add_(1, route.slot_gpu, per_slot)


def _aligned(rows: int) -> int:
    """rows rounded up to a multiple of ROW_ALIGN (at least ROW_ALIGN)."""
    return max(ROW_ALIGN, -(-rows // ROW_ALIGN) * ROW_ALIGN)


def check_transport(transport: str) -> None:
    """Raise ValueError unless `transport` is one of TRANSPORTS."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport {transport!r}: expected one of {TRANSPORTS}")

