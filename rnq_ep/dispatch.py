"""Move a step's tokens to their expert copies and back, as the step's `StepLayout` says.

Collectives per layer step (functional collectives, so a compiled graph holds them):
  gather_counts  all_gather(counts, input health [E + 2] int64)              both transports
  exact          all_to_all_single(unique rows per peer [R], equal split)     then ONE device->host copy
                 all_to_all_single(payload [U, bytes], uneven)                 rows + (local copy, weight) x k
                 all_to_all_single(partial sums [U', H], uneven)               combine
  capacity       all_to_all_single(payload [R * cap, bytes], equal split)     zero host syncs
                 all_to_all_single(partial sums [R * cap, H], equal split)     combine
A row is one token for one destination GPU (dedupe); its bytes carry the token's hidden vector
and, for each of its k entries, the local copy on that GPU (-1: the entry goes elsewhere) and the
router weight. The exact transport's one host read gives the uneven split sizes and the inputs'
health; the capacity transport pads each peer's block to `Capacity.peer_rows` and flags
overflow on the device (StepLayout.overflow), identically on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from rnq_ep.layout import StepLayout

META_BYTES = 4 + 4  # per entry a row carries: int32 local copy, fp32 router weight


@dataclass(frozen=True)
class Received:
    """What the experts get and what combine needs: N entries for this rank's C copies, sorted by copy."""

    entry_row: torch.Tensor  # [N] int64 received row behind each entry
    weights: torch.Tensor  # [N] fp32 router weight (0 for padding entries)
    offsets: torch.Tensor  # [C + 1] int64 entries of copy c: [offsets[c], offsets[c + 1])
    valid: torch.Tensor | None  # [N] bool real entries (capacity); None: all real (exact)
    num_rows: int  # rows received (exact: sum over peers; capacity: R * cap)
    send_sizes: tuple[int, ...] | None  # exact: unique rows sent to each rank
    recv_sizes: tuple[int, ...] | None  # exact: unique rows received from each rank


def world_size(group: dist.ProcessGroup | None) -> int:
    """Ranks in `group` (None: the default group), 1 without an initialised process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def gather_counts(local: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """Every rank's row of counts and flags, stacked: [n] -> [R, n] (one all-gather)."""
    if world == 1:
        return local[None]
    return fc.all_gather_single(local, 0, _group(group)).reshape(world, -1)


def dispatch(
    x: torch.Tensor, topk_weights: torch.Tensor, layout: StepLayout, num_copies: int, rank: int,
    group: dist.ProcessGroup | None, world: int,
) -> tuple[torch.Tensor, Received]:
    """x [T, H] -> rows for this rank's copies [N, H] sorted by copy, and the Received record."""
    top_k = layout.slots.shape[1]
    hidden = x.shape[1]
    weights = topk_weights.float()
    if layout.capacity is None:
        send_sizes, recv_sizes, num_entries = _exact_sizes(layout, rank, group, world)
        rows = sum(send_sizes)
        x_send = x[layout.row_token[:rows]]  # [U, H]
    else:
        send_sizes = recv_sizes = None
        rows = world * layout.capacity.peer_rows
        num_entries = layout.capacity.expert_rows
        x_send = torch.cat([x, x.new_zeros(1, hidden)])[layout.row_token]  # [R * cap, H], empty rows zero
    # + 1 row: where a capacity step's dropped entries are written
    meta_copy = torch.full((rows + 1, top_k), -1, dtype=torch.int32, device=x.device)
    meta_weight = torch.zeros(rows + 1, top_k, dtype=torch.float32, device=x.device)
    at = (layout.send_index * top_k + torch.arange(top_k, device=x.device)).reshape(-1)  # [A] (row, j)
    meta_copy.view(-1).index_copy_(0, at, layout.meta_copy.reshape(-1))
    meta_weight.view(-1).index_copy_(0, at, weights.reshape(-1))
    payload = torch.cat([_bytes(x_send), _bytes(meta_copy[:rows]), _bytes(meta_weight[:rows])], dim=1)
    recv = _all_to_all(payload, send_sizes, recv_sizes, group, world)  # [rows', bytes]
    num_rows = recv.shape[0]
    x_bytes = hidden * x.element_size()
    x_recv = recv[:, :x_bytes].contiguous().view(x.dtype)  # [rows', H]
    copies = recv[:, x_bytes : x_bytes + 4 * top_k].contiguous().view(torch.int32).reshape(-1).long()  # [rows' * k]
    entry_weights = recv[:, x_bytes + 4 * top_k :].contiguous().view(torch.float32).reshape(-1)
    key = torch.where(copies >= 0, copies, num_copies)  # padding entries sort last
    order = torch.argsort(key, stable=True)[:num_entries]  # [N]
    per_copy = torch.zeros(num_copies + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))
    offsets = torch.cat([per_copy.new_zeros(1), torch.cumsum(per_copy[:num_copies], 0)])  # [C + 1]
    entry_row = order // top_k
    valid = None
    entry_w = entry_weights[order]
    if layout.capacity is not None:
        valid = key[order] < num_copies
        entry_w = torch.where(valid, entry_w, 0.0)
    received = Received(entry_row, entry_w, offsets, valid, num_rows, send_sizes, recv_sizes)
    return x_recv[entry_row], received


def combine(
    y: torch.Tensor, layout: StepLayout, received: Received, num_tokens: int, dtype: torch.dtype,
    group: dist.ProcessGroup | None, world: int,
) -> torch.Tensor:
    """Sum router-weighted expert outputs y [N, H] back onto their tokens (fp32 sums): -> [T, H] in `dtype`."""
    hidden = y.shape[1]
    y = y.float()
    if received.valid is not None:
        y = torch.where(received.valid[:, None], y, 0.0)
    partial = torch.zeros(received.num_rows, hidden, dtype=torch.float32, device=y.device)
    partial.index_add_(0, received.entry_row, y)  # [N, H] -> [rows', H], one partial sum per row
    back = _all_to_all(partial.to(dtype), received.recv_sizes, received.send_sizes, group, world).float()
    token = layout.row_token[: back.shape[0]]  # [rows]: the token each row came from (capacity: T for an empty one)
    out = torch.zeros(num_tokens + 1, hidden, dtype=torch.float32, device=y.device)
    return out.index_add_(0, token, back)[:num_tokens].to(dtype)


def _exact_sizes(
    layout: StepLayout, rank: int, group: dist.ProcessGroup | None, world: int
) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """The exact transport's one device->host copy: rows sent to / received from each rank, entries served here."""
    recv_rows = layout.send_rows if world == 1 else fc.all_to_all_single(
        layout.send_rows, [1] * world, [1] * world, _group(group))
    host = torch.cat([layout.send_rows, recv_rows, layout.tokens_per_gpu[rank : rank + 1], layout.health.reshape(-1)])
    sizes = host.tolist()  # THE device->host copy of this step
    bad, first_bad = sizes[2 * world + 1 :: 2], sizes[2 * world + 2 :: 2]
    if bad[rank]:
        num_experts = layout.counts.shape[1]
        raise ValueError(f"dispatch: expert id {first_bad[rank]} out of range for {num_experts} experts")
    if any(bad):
        raise ValueError(f"dispatch: ranks {[r for r, b in enumerate(bad) if b]} rejected their inputs (see their errors)")
    return tuple(sizes[:world]), tuple(sizes[world : 2 * world]), sizes[2 * world]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A [n, m] tensor's rows as bytes: -> [n, m * itemsize] uint8 (no copy when contiguous)."""
    return t.contiguous().view(torch.uint8)


def _all_to_all(
    t: torch.Tensor, send: tuple[int, ...] | None, recv: tuple[int, ...] | None,
    group: dist.ProcessGroup | None, world: int,
) -> torch.Tensor:
    """all_to_all_single along dim 0: uneven with host sizes, equal split when they are None."""
    if world == 1:
        return t
    if send is None:
        return fc.all_to_all_single(t.contiguous(), None, None, _group(group))
    return fc.all_to_all_single(t.contiguous(), list(recv), list(send), _group(group))


def _group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The process group a functional collective runs on (None: the default group)."""
    return dist.group.WORLD if group is None else group
