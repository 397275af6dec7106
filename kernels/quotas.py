"""Least-loaded quotas on the GPU: `balance.water_fill`'s pours, in its order, in one Triton program.

water_fill fixes single-copy experts, then pours each replicated expert (heaviest first) onto the
GPUs of its copies up to a common level, re-pouring every expert given everyone else's load until a
sweep changes nothing (at most MAX_REFINE_PASSES more sweeps). A pour over c copies is a few
integer ops; the sweeps are sequential. One program holds the GPU loads [G] and every pour's parts
[P, C] in registers, so a pour reads no memory; ties break as on the host (the pour's slots come
in water_fill's tie order, ranks by level then position). Integer arithmetic throughout, so
every rank computes the same quotas from the same counts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rnq_ep.balance import MAX_REFINE_PASSES

_BIG = 2**62  # level of a padding bin: never filled


@triton.jit
def _water_fill_kernel(
    quotas_ptr, base_ptr, amount_ptr, order_ptr, slots_ptr, slot_gpu_ptr, num_gpus, num_pours,
    PASSES: tl.constexpr, POURS: tl.constexpr, COPIES: tl.constexpr, GPUS: tl.constexpr, BIG: tl.constexpr,
):
    """Pour every replicated expert (rows of slots [P, COPIES], -1 padded) in `order`; store its parts as quotas."""
    gid = tl.arange(0, GPUS)
    load = tl.load(base_ptr + gid, mask=gid < num_gpus, other=0)  # [GPUS]
    prow = tl.arange(0, POURS)
    col = tl.arange(0, COPIES)
    in_range = (prow[:, None] < num_pours) & (col[None, :] < COPIES)
    slots = tl.load(slots_ptr + prow[:, None] * COPIES + col[None, :], mask=in_range, other=-1)  # [POURS, COPIES]
    valid = slots >= 0
    gpus = tl.load(slot_gpu_ptr + tl.where(valid, slots, 0), mask=valid, other=-1)  # [POURS, COPIES]
    amounts = tl.load(amount_ptr + prow, mask=prow < num_pours, other=0)  # [POURS]
    parts = tl.zeros([POURS, COPIES], dtype=tl.int64)
    rank_j = tl.arange(0, COPIES)
    k_of = tl.arange(0, COPIES) + 1  # candidate number of filled bins
    sweep = 0
    changed = 1
    while (sweep < PASSES) & (changed != 0):
        changed = 0
        for i in range(num_pours):
            p = tl.load(order_ptr + i)
            row = prow == p  # [POURS]
            on = tl.sum(tl.where(row[:, None], gpus, 0), axis=0)  # [COPIES] GPU of each bin
            ok = tl.sum(tl.where(row[:, None] & valid, 1, 0), axis=0) > 0  # [COPIES]
            old = tl.sum(tl.where(row[:, None], parts, 0), axis=0)  # [COPIES]
            amount = tl.sum(tl.where(row, amounts, 0), axis=0)
            hit = (on[:, None] == gid[None, :]) & ok[:, None]  # [COPIES, GPUS]
            load = load - tl.sum(tl.where(hit, old[:, None], 0), axis=0)
            level = tl.where(ok, tl.sum(tl.where(hit, load[None, :], 0), axis=1), BIG)  # [COPIES]
            n = tl.sum(ok.to(tl.int64), axis=0)
            # rank of each bin by (level, position): the host's stable sort
            before = (level[None, :] < level[:, None]) | ((level[None, :] == level[:, None]) & (rank_j[None, :] < rank_j[:, None]))
            rank = tl.sum(before.to(tl.int64), axis=1)  # [COPIES]
            below = tl.sum(tl.where(rank[None, :] < k_of[:, None], level[None, :], 0), axis=1)  # [k] sum of k lowest
            nxt = tl.sum(tl.where(rank[None, :] == k_of[:, None], level[None, :], 0), axis=1)  # [k] the (k+1)-th level
            stop = (k_of >= n) | (k_of * nxt - below >= amount)
            k = tl.min(tl.where(stop, k_of, COPIES + 1), axis=0)
            below_k = tl.sum(tl.where(k_of == k, below, 0), axis=0)
            water = (amount + below_k) // k
            extra = (amount + below_k) - water * k
            part = tl.where(ok & (rank < k), water - level + (rank < extra).to(tl.int64), 0)  # [COPIES]
            load = load + tl.sum(tl.where(hit, part[:, None], 0), axis=0)
            changed = changed | tl.sum((part != old).to(tl.int32), axis=0)
            parts = tl.where(row[:, None], part[None, :], parts)
        sweep += 1
    tl.store(quotas_ptr + tl.where(valid, slots, 0), parts, mask=valid)


def water_fill_quotas(
    total: torch.Tensor,
    slot_gpu: torch.Tensor,
    slot_expert: torch.Tensor,
    pour_experts: torch.Tensor,
    pour_slots: torch.Tensor,
    num_gpus: int,
) -> torch.Tensor:
    """balance.water_fill on the device: total [E] int64, the table's pours [P], [P, C] -> quotas [S] int64."""
    num_slots = slot_gpu.shape[0]
    quotas = torch.cat([total[slot_expert], total.new_zeros(1)])  # [S + 1], the last takes padding writes
    pad = torch.where(pour_slots >= 0, pour_slots, num_slots).reshape(-1)
    quotas = quotas.index_fill(0, pad, 0)[:num_slots].contiguous()  # replicated experts' copies start empty
    base = torch.zeros(num_gpus, dtype=torch.int64, device=total.device).scatter_add_(0, slot_gpu, quotas)
    num_pours = pour_experts.shape[0]
    if num_pours == 0:
        return quotas
    amounts = total[pour_experts].contiguous()
    order = torch.argsort(-amounts, stable=True)  # heaviest first, ties by expert id
    copies = triton.next_power_of_2(pour_slots.shape[1])
    slots = torch.full((num_pours, copies), -1, dtype=torch.int64, device=total.device)
    slots[:, : pour_slots.shape[1]] = pour_slots
    _water_fill_kernel[(1,)](
        quotas, base, amounts, order, slots, slot_gpu, num_gpus, num_pours,
        PASSES=MAX_REFINE_PASSES + 1, POURS=triton.next_power_of_2(num_pours), COPIES=copies,
        GPUS=triton.next_power_of_2(num_gpus), BIG=_BIG, num_warps=4,
    )
    return quotas
