"""Per-copy quotas of one step on the tokens' device, for every routing policy.

- `least-loaded`: `balance.water_fill` exactly, as one op (`rnq_ep::least_loaded_quotas`): on a
  GPU one Triton launch (`rnq_ep.kernels.quotas`, the same pours in the same order), on the CPU
  the host function itself, where the host is the device. One opaque op keeps torch.compile
  graphs whole and CUDA graphs capturable.
- `static`: the plan's shares by largest remainder (`balance.share_quotas`), in torch ops.
- `hash`: position mod copy count over the rank-major order (`routing`), in torch ops.

The table's constants (`RouteTable`) are built once per plan switch, never per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from rnq_ep.balance import SlotTable, tie_order, water_fill
from rnq_ep.routing import POLICIES, residues_below, slot_index

if not torch.cuda.is_available():  # as rnq_ep.kernels: calling a custom op imports triton, which reads this once
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass(frozen=True)
class RouteTable:
    """A layer's slot table as tensors on the tokens' device, with the policy checked once."""

    table: SlotTable
    policy: str
    rank: int
    device: torch.device
    num_gpus: int  # R
    num_experts: int  # E
    num_local: int  # C, copies on this rank
    slot_gpu: torch.Tensor  # [S] int64
    slot_expert: torch.Tensor  # [S] int64
    slot_fmt: torch.Tensor  # [S] int8 format codes
    slot_local: torch.Tensor  # [S] int64 index of each slot among its GPU's copies, format-major (LocalExperts order)
    share: torch.Tensor  # [S] float64 planned share of the expert's tokens
    order: torch.Tensor  # [S] slots sorted by (expert, slot)
    first: torch.Tensor  # [E] start of each expert's copies in `order`
    copy_count: torch.Tensor  # [E] int64
    copy_index: torch.Tensor  # [S] index of each slot among its expert's copies
    pour_experts: torch.Tensor  # [P] int64 experts with two or more copies
    pour_slots: torch.Tensor  # [P, C] int64 their slots in water_fill's tie order (bf16 first, GPU), -1 padded
    local_table_index: np.ndarray  # [C] each local copy's index in table order (the numbering stats report)


def route_table(table: SlotTable, rank: int, policy: str, device: torch.device | str = "cpu") -> RouteTable:
    """The per-table constants of routing on `device`; ValueError for an unknown policy or unusable shares."""
    if policy not in POLICIES:
        raise ValueError(f"routing policy {policy!r}: expected one of {POLICIES}")
    if not 0 <= rank < table.num_gpus:
        raise ValueError(f"rank {rank} out of range for a table of {table.num_gpus} GPUs")
    index = slot_index(table)  # the host reference's per-table constants: expert order, copy index, shares
    if policy == "static" and index.share_problem is not None:
        raise ValueError(f"static routing: {index.share_problem}")
    # format-major within each GPU: each format's rows are one contiguous run of the experts' buffer
    by_gpu = np.lexsort((np.arange(table.num_slots), table.fmt, table.gpu))
    per_gpu = np.bincount(table.gpu, minlength=table.num_gpus)
    local = np.empty(table.num_slots, dtype=np.int64)
    local[by_gpu] = np.arange(table.num_slots) - (np.cumsum(per_gpu) - per_gpu)[table.gpu[by_gpu]]
    mine = np.flatnonzero(table.gpu == rank)  # this rank's slots, table order
    local_table_index = np.searchsorted(mine, mine[np.argsort(local[mine], kind="stable")])
    pour_experts, pour_slots = _pours(table)

    def on(a: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return RouteTable(
        table=table, policy=policy, rank=rank, device=torch.device(device), num_gpus=table.num_gpus,
        num_experts=table.num_experts, num_local=int(per_gpu[rank]), slot_gpu=on(table.gpu), slot_expert=on(table.expert),
        slot_fmt=on(table.fmt, torch.int8), slot_local=on(local), share=on(table.share, torch.float64),
        order=on(index.order), first=on(index.first), copy_count=on(table.copy_count()),
        copy_index=on(index.copy_index),
        pour_experts=on(pour_experts), pour_slots=on(pour_slots), local_table_index=local_table_index,
    )


def policy_quotas(total: torch.Tensor, route: RouteTable) -> torch.Tensor:
    """Tokens per copy for the step: total [E] int64 (all ranks) -> [S] int64, on total's device."""
    if route.policy == "least-loaded":
        return torch.ops.rnq_ep.least_loaded_quotas(
            total, route.slot_gpu, route.slot_expert, route.slot_fmt, route.pour_experts, route.pour_slots,
            route.num_gpus,
        )
    if route.policy == "static":
        return _share_quotas(total, route)
    return residues_below(total[route.slot_expert], route.copy_index, route.copy_count[route.slot_expert])


@torch.library.custom_op("rnq_ep::least_loaded_quotas", mutates_args=())
def least_loaded_quotas(
    total: torch.Tensor,
    slot_gpu: torch.Tensor,
    slot_expert: torch.Tensor,
    slot_fmt: torch.Tensor,
    pour_experts: torch.Tensor,
    pour_slots: torch.Tensor,
    num_gpus: int,
) -> torch.Tensor:
    """balance.water_fill of total [E] over the table's slots: -> [S] int64 (GPU: Triton; CPU: the host function)."""
    if total.is_cuda:
        from rnq_ep.kernels.quotas import water_fill_quotas

        return water_fill_quotas(total, slot_gpu, slot_expert, pour_experts, pour_slots, num_gpus)
    table = SlotTable(
        slot_gpu.numpy(), slot_expert.numpy(), slot_fmt.numpy(), np.zeros(slot_gpu.shape[0]), num_gpus, total.shape[0]
    )
    return torch.from_numpy(water_fill(table, total.numpy()))


@least_loaded_quotas.register_fake
def _least_loaded_quotas_fake(total, slot_gpu, slot_expert, slot_fmt, pour_experts, pour_slots, num_gpus):
    return slot_gpu.new_empty(slot_gpu.shape, dtype=torch.int64)


def _share_quotas(total: torch.Tensor, route: RouteTable) -> torch.Tensor:
    """balance.share_quotas in torch ops: largest remainder per expert, ties by slot order: [E] -> [S]."""
    expert = route.slot_expert
    ideal = total[expert].double() * route.share  # [S]
    quotas = torch.floor(ideal).long()
    given = torch.zeros_like(total).scatter_add_(0, expert, quotas)
    remainder = total - given  # [E]
    frac = ideal - quotas
    by_frac = torch.argsort(-frac, stable=True)  # ties keep slot order
    order = by_frac[torch.argsort(expert[by_frac], stable=True)]  # by expert, then -frac, then slot
    rank_in_expert = torch.arange(expert.shape[0], device=total.device) - route.first[expert[order]]
    bump = (rank_in_expert < remainder[expert[order]]).long()
    return quotas.index_add(0, order, bump)


def _pours(table: SlotTable) -> tuple[np.ndarray, np.ndarray]:
    """Experts with >= 2 copies [P] and their slots in water_fill's tie order [P, C] (-1 padded)."""
    copy_count = table.copy_count()
    multi = np.flatnonzero(copy_count > 1)
    width = int(copy_count.max()) if len(multi) else 1
    by_tie = tie_order(table)
    first = np.searchsorted(table.expert[by_tie], multi)
    slots = np.full((len(multi), width), -1, dtype=np.int64)
    for p, (start, count) in enumerate(zip(first, copy_count[multi])):
        slots[p, :count] = by_tie[start : start + count]
    return multi.astype(np.int64), slots
