"""All-to-all dispatch of routed tokens to expert copies, and the combine that brings them back.

Collectives per step, all on `group` (world size 1 runs the same code with none):
  dispatch  all_gather(counts [E + 2] int64)     per-expert counts, hidden size, input-ok flag
            all_to_all_single(meta [A, 3] int32)  per (token, k): row in its block, local copy, weight
            all_to_all_single(x [U, H])           one row per unique (token, destination GPU)
  combine   all_to_all_single(y [U', H])          one partial sum per unique (token, destination GPU)
Split sizes: the meta sizes follow from the gathered counts (routing is exact, so every rank knows
how many (token, k) each rank sends to each copy); the x sizes from the meta itself (a sender
numbers its rows 0..u-1 per destination, the receiver reads u off the block's last entry);
combine reverses x. Both sides of every exchange derive sizes from the same data, because gloo
aborts the process on sizes that disagree. A rank with bad inputs still joins the all-gather
(flag 0), so every rank raises instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rnq_ep.balance import SlotTable, gpu_loads
from rnq_ep.routing import POLICIES, SlotIndex, check_topk_ids, slot_index, step_quotas, step_rank_copy_counts, step_route

META_BYTES = 3 * 4  # per (token, k) sent: row in block, local copy, fp32 router weight (int32 bits)


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs to undo dispatch, plus this step's routing and traffic stats."""

    group: dist.ProcessGroup | None
    num_tokens: int  # T, this rank's tokens
    dtype: torch.dtype  # x's dtype, also combine's output dtype
    local_slots: np.ndarray  # [C] slot index (into the table) of each local copy
    local_offsets: torch.Tensor  # [C + 1] int32, recv rows of local copy c: [off[c], off[c + 1])
    recv_weights: torch.Tensor  # [N] fp32 router weight of each recv row
    recv_row: torch.Tensor  # [N] int64 received unique row behind each recv row
    sent_token: torch.Tensor  # [U] int64 source token of each unique row sent, by destination
    send_counts: tuple[int, ...]  # [R] unique rows sent to each rank
    recv_counts: tuple[int, ...]  # [R] unique rows received from each rank
    tokens_per_gpu: np.ndarray  # [R] (token, k) assignments each GPU serves this step, all ranks
    tokens_per_copy: np.ndarray  # [C] recv rows per local copy
    bytes_sent: int  # rows + meta this rank sends to other ranks, with dedupe
    bytes_sent_no_dedupe: int  # the same if every (token, k) travelled as its own row
    expert_counts: torch.Tensor  # [E] int64 this rank's (token, k) per expert, on x's device


def dispatch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    table: SlotTable,
    rank: int,
    group: dist.ProcessGroup | None = None,
    policy: str = "least-loaded",
    index: SlotIndex | None = None,
    counts: tuple[torch.Tensor, np.ndarray] | None = None,
) -> tuple[torch.Tensor, DispatchHandle]:
    """Send each token once per destination GPU and fan it out there: x [T, H] -> recv [N, H] by local copy.

    `index`: slot_index(table, x.device), which a layer keeps between steps; built here when None.
    `counts`: gather_counts of these inputs when the caller has made that all-gather already (SpillMoE).
    """
    world = world_size(group)
    if table.num_gpus != world:
        raise ValueError(f"slot table has {table.num_gpus} GPUs but the process group has {world} ranks")
    if world > 1 and rank != dist.get_rank(group):
        raise ValueError(f"rank {rank} given, but this process is rank {dist.get_rank(group)} of the group")
    if policy not in POLICIES:
        raise ValueError(f"routing policy {policy!r}: expected one of {POLICIES}")
    if index is None:
        index = slot_index(table, x.device)
    elif index.table is not table or index.device != x.device:
        raise ValueError(f"dispatch: index was built for another table or device ({index.device}; x is on {x.device})")
    local_counts, counts = counts or gather_counts(x, topk_ids, topk_weights, table.num_experts, group, world)  # [E], [R, E]
    quotas = step_quotas(counts, index, policy)
    slots = step_route(counts, index, topk_ids.reshape(-1).long(), local_counts, rank, policy, quotas)  # [T*k]
    slots = slots.reshape(topk_ids.shape)  # [T*k] -> [T, k]
    assigned = step_rank_copy_counts(counts, index, policy, quotas) @ index.on_gpu  # [R src, R dst] (token, k)

    sent_token, send_counts, meta = _pack(slots, topk_weights, index)
    recv_meta = _all_to_all(meta, assigned[rank], assigned[:, rank], group, world)  # [A', 3]
    recv_counts = _rows_per_source(recv_meta, assigned[:, rank])
    x_recv = _all_to_all(x[sent_token], send_counts, recv_counts, group, world)  # [U', H]
    local_slots = np.flatnonzero(table.gpu == rank)
    recv_row, recv_weights, tokens_per_copy = _fan_out(recv_meta, assigned[:, rank], recv_counts, len(local_slots))

    remote = np.arange(world) != rank
    meta_bytes = int(assigned[rank, remote].sum()) * META_BYTES
    row_bytes = x.shape[1] * x.element_size()
    handle = DispatchHandle(
        group=group,
        num_tokens=x.shape[0],
        dtype=x.dtype,
        local_slots=local_slots,
        local_offsets=torch.cat([tokens_per_copy.new_zeros(1), torch.cumsum(tokens_per_copy, 0)]).int(),
        recv_weights=recv_weights,
        recv_row=recv_row,
        sent_token=sent_token,
        send_counts=send_counts,
        recv_counts=recv_counts,
        tokens_per_gpu=gpu_loads(table, quotas).astype(np.int64),
        tokens_per_copy=tokens_per_copy.cpu().numpy(),
        expert_counts=local_counts,
        bytes_sent=int(np.array(send_counts)[remote].sum()) * row_bytes + meta_bytes,
        bytes_sent_no_dedupe=int(assigned[rank, remote].sum()) * row_bytes + meta_bytes,
    )
    return x_recv[recv_row], handle


def gather_counts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None,
    world: int,
) -> tuple[torch.Tensor, np.ndarray]:
    """This rank's per-expert counts [E] and all ranks' [R, E] from one all-gather; every rank raises if any input is bad."""
    problem = _input_problem(x, topk_ids, topk_weights, num_experts)
    local_counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    if problem is None:
        local_counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)  # [E]
    flags = torch.tensor([x.shape[1] if x.dim() == 2 else -1, problem is None], dtype=torch.int64, device=x.device)
    gathered = all_gather_rows(torch.cat([local_counts, flags]), group, world).cpu().numpy()  # [R, E + 2]
    _raise_on_problems(problem, gathered[:, num_experts], gathered[:, num_experts + 1])
    return local_counts, gathered[:, :num_experts]


def _pack(
    slots: torch.Tensor, topk_weights: torch.Tensor, index: SlotIndex
) -> tuple[torch.Tensor, tuple[int, ...], torch.Tensor]:
    """One row per unique (destination, token), grouped by destination: slots [T, k] -> token of each
    row [U], rows per destination [R], meta [A, 3] (row in its destination's block, local copy, weight)."""
    device, (num_tokens, top_k) = slots.device, slots.shape
    slots = slots.reshape(-1)  # [T, k] -> [A]
    dest = index.gpu_t[slots]  # [A]
    token = torch.arange(len(slots), device=device) // top_k  # [A]
    stride = max(num_tokens, 1)
    key = dest * stride + token  # [A] (destination, token) pair
    order = torch.argsort(key, stable=True)  # [A] grouped by destination, token order within
    pair, row_of = torch.unique_consecutive(key[order], return_inverse=True)  # [U], [A]
    send_counts = torch.bincount(pair // stride, minlength=index.table.num_gpus)  # [R]
    row_in_block = row_of - (torch.cumsum(send_counts, 0) - send_counts)[dest[order]]  # [A]
    local_copy = index.local_copy_t[slots[order]]  # [A]
    weight_bits = topk_weights.reshape(-1)[order].float().view(torch.int32)  # [A], exact bits
    meta = torch.stack([row_in_block.int(), local_copy.int(), weight_bits], dim=1)  # [A, 3]
    return pair % stride, tuple(send_counts.tolist()), meta


def _rows_per_source(recv_meta: torch.Tensor, meta_per_source: np.ndarray) -> tuple[int, ...]:
    """Unique rows each rank sends here: its block's last row index + 1 (meta [A', 3] -> [R])."""
    ends = np.cumsum(meta_per_source)
    last_rows = recv_meta[torch.from_numpy(ends[meta_per_source > 0] - 1).to(recv_meta.device), 0].tolist()
    rows = np.zeros(len(meta_per_source), dtype=np.int64)
    rows[meta_per_source > 0] = np.array(last_rows, dtype=np.int64) + 1
    return tuple(rows.tolist())


def _fan_out(
    recv_meta: torch.Tensor, meta_per_source: np.ndarray, rows_per_source: tuple[int, ...], num_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One recv row per (token, local copy), sorted by copy: received row behind each [N], its
    router weight [N] fp32, rows per local copy [C]."""
    device = recv_meta.device
    source = torch.repeat_interleave(torch.arange(len(meta_per_source), device=device),
                                     torch.from_numpy(meta_per_source).to(device))  # [A']
    rows = torch.tensor(rows_per_source, dtype=torch.int64, device=device)
    unique_row = (torch.cumsum(rows, 0) - rows)[source] + recv_meta[:, 0].long()  # [A'] into x_recv
    copy = recv_meta[:, 1].long()
    by_copy = torch.argsort(copy, stable=True)
    weights = recv_meta[:, 2].contiguous().view(torch.float32)
    return unique_row[by_copy], weights[by_copy], torch.bincount(copy, minlength=num_local)


def combine(y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Sum weighted expert outputs back onto their tokens (fp32 sums): y [N, H] -> out [T, H] in x's dtype.

    `y` rows must already carry their router weight (handle.recv_weights). Partial sums travel in
    x's dtype, one row per unique (token, destination GPU), as DeepEP's combine does.
    """
    if y.dim() != 2 or y.shape[0] != len(handle.recv_row):
        raise ValueError(f"combine: y has shape {tuple(y.shape)}, expected ({len(handle.recv_row)}, hidden)")
    hidden = y.shape[1]
    partial = torch.zeros(sum(handle.recv_counts), hidden, dtype=torch.float32, device=y.device)
    partial.index_add_(0, handle.recv_row, y.float())  # [N, H] -> [U', H]
    world = len(handle.send_counts)
    back = _all_to_all(partial.to(handle.dtype), handle.recv_counts, handle.send_counts, handle.group, world)
    out = torch.zeros(handle.num_tokens, hidden, dtype=torch.float32, device=y.device)
    return out.index_add_(0, handle.sent_token, back.float()).to(handle.dtype)  # [U, H] -> [T, H]


def _input_problem(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> str | None:
    """What is wrong with this rank's inputs, or None."""
    if x.dim() != 2:
        return f"x must be [tokens, hidden], got shape {tuple(x.shape)}"
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        return f"topk_ids has shape {tuple(topk_ids.shape)}, expected ({x.shape[0]}, k) for x of shape {tuple(x.shape)}"
    if topk_weights.shape != topk_ids.shape:
        return f"topk_weights has shape {tuple(topk_weights.shape)}, expected topk_ids' shape {tuple(topk_ids.shape)}"
    try:
        check_topk_ids(topk_ids, num_experts)
    except ValueError as err:
        return str(err)
    return None


def _raise_on_problems(problem: str | None, hidden_sizes: np.ndarray, ok: np.ndarray) -> None:
    """Raise on every rank if any rank's inputs were bad or hidden sizes differ between ranks."""
    if problem is not None:
        raise ValueError(f"dispatch: {problem}")
    if not ok.all():
        raise ValueError(f"dispatch: ranks {np.flatnonzero(ok == 0).tolist()} rejected their inputs (see their errors)")
    if (hidden_sizes != hidden_sizes[0]).any():
        raise ValueError(f"dispatch: hidden size differs between ranks (by rank: {hidden_sizes.tolist()})")


def world_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in `group` (None: the default group), 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """Every rank's copy of t, stacked: [n] -> [R, n]."""
    if world == 1:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


def _all_to_all(
    t: torch.Tensor, send: Sequence[int], recv: Sequence[int], group: dist.ProcessGroup | None, world: int
) -> torch.Tensor:
    """Uneven all-to-all along dim 0: rows [sum(send), ...] -> [sum(recv), ...]."""
    if world == 1:
        return t
    out = t.new_empty((int(sum(recv)), *t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), [int(n) for n in recv], [int(n) for n in send], group=group)
    return out
