"""SpillMoE: an EPMoE that spills, per step, what its routing leaves over LLEP's threshold onto idle GPUs,
sending the expert weights along (LLEP; R&Q + int8/int4 spill).

Per forward, on every rank:
1. dispatch.gather_counts: one all_gather of this step's per-expert counts of every rank (+ hidden size and
   an input-ok flag; every rank raises on any rank's bad input). Dispatch takes the result instead of
   gathering again, so a spilling step makes the same one counts all-gather as EPMoE's.
2. The same Step everywhere (`spill_step`, pure): the layer's routing policy splits the counts over
   the copies (`static` on plain EP: LLEP's start; `least-loaded`: R&Q's), then `policies.llep_spill`
   moves what is over the threshold, appending spilled copies to the table.
3. all_to_all_single(uint8 payload), only when a copy moves: each spilled copy's source rank sends its
   copy, in the spill format when the copy is bf16 (quantized on the fly) and as stored otherwise (an
   int8 copy cannot be made bf16, and re-quantizing int8 to int4 would round twice). Split sizes come
   from the Step (`transfer_matrix`), so they agree on every rank; packing and unpacking are the
   staged migration's (`rnq_ep.rebalance.migrate`). Then all_reduce(ok flag, MIN): a rank that failed
   to pack (it sends zeros of the agreed size) or to unpack makes every rank run the step unspilled.
4. EPMoE's own forward on the spilled table with `static` routing on shares = quotas / count, which
   `share_quotas` turns back into exactly the Step's quotas; resident copies run as they are, the
   received ones (the rank's last local slots, so its last recv rows) as temporary LocalExperts,
   freed after the step.
A step whose routing already stays under the threshold runs as EPMoE does, with no exchange.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rnq_ep.balance import SlotTable
from rnq_ep.experts import LocalExperts
from rnq_ep.dispatch import world_size
from rnq_ep.layer import EPMoE, LayerStats
from rnq_ep.policies import LLEP_CAPACITY, LLEP_MIN_CHUNK, LLEP_THRESHOLD, Step, llep_spill
from rnq_ep.rebalance.migrate import all_ready, exchange_bytes, layer_device, pack_copies, stage_copies
from rnq_ep.rebalance.moves import CopyMove, transfer_matrix
from rnq_ep.routing import SlotIndex, slot_index, step_quotas
from rnq_ep.specs import FORMATS

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class SpillStats(LayerStats):
    """LayerStats plus what the step's spill moved (whole layer, all ranks, unless it says this rank).

    tokens_per_copy has C + M entries: this rank's C resident copies, then the M spilled onto it this step.
    """

    spilled_copies: int = 0  # copies sent between GPUs this step
    moved_bytes: int = 0  # their weight bytes
    received_bytes: int = 0  # the part this rank received
    spill_seconds: float = 0.0  # this rank's wall time gathering counts, planning and moving weights


@dataclass(frozen=True)
class SpillPlan:
    """One step's spill: the Step and the weight copies it sends, with their exact formats."""

    step: Step  # llep_spill's, each spilled copy in the format it travels in
    start: np.ndarray  # [S] quotas of the layer's routing before spilling
    moves: tuple[CopyMove, ...]  # one peer move per spilled copy, new slot order

    @property
    def changed(self) -> bool:
        """True when spilling moved tokens (with or without weights)."""
        return bool(self.moves) or not np.array_equal(self.step.quotas, self.start)


def spill_step(
    table: SlotTable,
    counts: np.ndarray,
    policy: str,
    spill_fmt: str,
    threshold: float = LLEP_THRESHOLD,
    capacity: float = LLEP_CAPACITY,
    min_chunk: int = LLEP_MIN_CHUNK,
    index: SlotIndex | None = None,
) -> SpillPlan:
    """Route counts [R, E] by `policy`, then LLEP's spill on what is over `threshold`: the SpillPlan (pure)."""
    index = slot_index(table) if index is None else index
    counts = np.asarray(counts, np.int64)
    start = step_quotas(counts, index, policy)
    step = llep_spill(table, counts.sum(axis=0), threshold, capacity, min_chunk, start=start, spill_fmt=spill_fmt)
    return SpillPlan(step, start, peer_moves(table, step))


def peer_moves(table: SlotTable, step: Step) -> tuple[CopyMove, ...]:
    """The step's weight moves as migration CopyMoves: spilled slot i (appended after `table`'s) from its source copy."""
    moves = []
    for i, (src, dst, fmt) in enumerate(step.moves):
        slot = table.num_slots + i
        expert = int(step.table.expert[slot])
        source = int(np.flatnonzero((table.gpu == src) & (table.expert == expert))[0])
        moves.append(CopyMove(slot, expert, fmt, dst, src, source, "peer"))
    return tuple(moves)


def quota_table(step: Step) -> SlotTable:
    """The step's table with shares quotas / count, so static routing (share_quotas) gives exactly its quotas."""
    table = step.table
    count = np.bincount(table.expert, weights=step.quotas, minlength=table.num_experts)[table.expert]  # [S]
    share = np.where(count > 0, step.quotas / np.maximum(count, 1), table.share)
    return SlotTable.from_arrays(table.gpu, table.expert, table.fmt, share, table.num_gpus, table.num_experts)


class SpilledExperts:
    """This rank's resident copies, then the copies spilled onto it for one step (table order: resident first).

    Rows arrive format-major over all of them (rnq_ep.quotas numbers local copies by format, then slot),
    so resident and spilled copies interleave; each part's rows are gathered by host-known ranges (the
    spill path reads the counts on the host anyway) and run through its own LocalExperts.
    """

    def __init__(self, resident: LocalExperts, spilled: LocalExperts | None, table: SlotTable, rank: int) -> None:
        """Run `resident` and `spilled` (None: no copy came) on their rows of the step's `table` on `rank`."""
        self.resident, self.spilled = resident, spilled
        mine = np.flatnonzero(table.gpu == rank)  # resident slots, then the spilled ones
        fm = mine[np.lexsort((mine, table.fmt[mine]))]  # format-major, as the rows arrive
        self.is_resident = np.searchsorted(mine, fm) < resident.num_copies  # [C + M] per arriving copy

    def __call__(self, recv: torch.Tensor, local_offsets: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
        """recv [N, H] by local copy (local_offsets [C + M + 1]) -> row_weight-scaled outputs [N, H]."""
        bounds = local_offsets.tolist()
        out = torch.empty_like(recv)
        for experts, mask in ((self.resident, self.is_resident), (self.spilled, ~self.is_resident)):
            if experts is None or not mask.any():
                continue
            copies = np.flatnonzero(mask)
            rows = torch.cat([torch.arange(bounds[c], bounds[c + 1]) for c in copies]).to(recv.device)
            sizes = torch.tensor([bounds[c + 1] - bounds[c] for c in copies])
            offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).to(recv.device)
            out[rows] = experts(recv[rows], offsets, row_weight[rows])
        return out


class SpillMoE(EPMoE):
    """EPMoE whose every step spills the excess over `threshold` x mean GPU load (LLEP's rule), moving weights."""

    def __init__(self, *args: Any, spill_fmt: str = "bf16", threshold: float = LLEP_THRESHOLD,
                 capacity: float = LLEP_CAPACITY, min_chunk: int = LLEP_MIN_CHUNK, **kwargs: Any) -> None:
        """EPMoE's arguments (its `policy` is the split before spilling: `static` for LLEP on plain EP), plus
        LLEP's parameters and the format spilled bf16 copies are sent in."""
        super().__init__(*args, **kwargs)
        self.experts.check_rebuildable("spilling")
        if spill_fmt not in FORMATS:
            raise ValueError(f"spill_fmt {spill_fmt!r}: expected one of {FORMATS}")
        self.spill_fmt, self.threshold, self.capacity, self.min_chunk = spill_fmt, threshold, capacity, min_chunk
        self.last_spill: SpillPlan | None = None  # the last forward's (None: a rank's inputs were bad or a move failed)
        self._host_index: SlotIndex | None = None  # routing.slot_index of the resident table, for spill_step

    def forward_routed(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        gathered: torch.Tensor | None = None, transport: str | None = None,
    ) -> torch.Tensor:
        """x [T, H] with topk_ids/topk_weights [T, k] -> [T, H]; last_stats is a SpillStats. One counts all-gather
        serves the spill and the step; spilling plans on the host (LLEP's rule needs the counts there)."""
        start_s = time.perf_counter()
        self.last_spill = None
        inputs = self.step_inputs(x, topk_ids, topk_weights)
        if gathered is None:
            gathered = self.gather(inputs)  # [R, E + 2]
        host = gathered.cpu().numpy()
        if host[:, -2].any():  # a rank's inputs are bad: the step itself makes every rank raise
            return self.step(inputs, gathered, "exact")
        if self._host_index is None or self._host_index.table is not self.table:
            self._host_index = slot_index(self.table)
        plan = spill_step(self.table, host[:, :-2], self.policy, self.spill_fmt, self.threshold, self.capacity,
                          self.min_chunk, self._host_index)
        exchange = self._receive(plan) if plan.changed else None
        self.last_spill = None if plan.changed and exchange is None else plan
        if exchange is None:  # nothing over the threshold, or a rank could not move its copies
            spill_seconds = time.perf_counter() - start_s
            out = self.step(inputs, gathered, transport)
            self.last_stats = SpillStats(**vars(self.last_stats), spill_seconds=spill_seconds)
            return out
        spilled, moved_bytes, received = exchange
        spill_seconds = time.perf_counter() - start_s
        # EPMoE's forward serves the step from the spilled table: rebind what it reads for this one call
        resident = self.table, self.experts, self.policy, self._route  # the route too: kept for the next step
        spilled_table = quota_table(plan.step)
        self.table, self.experts = spilled_table, SpilledExperts(self.experts, spilled, spilled_table, self.rank)
        self.policy = "static"
        try:
            out = self.step(inputs, gathered, "exact")
        finally:
            self.table, self.experts, self.policy, self._route = resident
        self.last_stats = SpillStats(**vars(self.last_stats), spilled_copies=len(plan.moves), moved_bytes=moved_bytes,
                                     received_bytes=received, spill_seconds=spill_seconds)
        return out

    def _receive(self, plan: SpillPlan) -> tuple[LocalExperts | None, int, int] | None:
        """Send this rank's spilled copies, receive its own: (temporary experts or None, bytes moved, bytes received);
        None on every rank when any rank failed to pack or unpack."""
        world, rank, moves = world_size(self.group), self.rank, list(plan.moves)
        matrix = transfer_matrix(moves, self.model, world)  # [src, dst] bytes, the same on every rank
        if not matrix.any():
            return None, 0, 0
        device, spilled, ok = layer_device(self), None, True
        try:
            payload = pack_copies([m for m in moves if m.src == rank], self, device)
        except Exception:
            log.exception("layer %d: packing spilled copies failed on rank %d; the step runs unspilled", self.layer, rank)
            payload, ok = torch.zeros(int(matrix[rank].sum()), dtype=torch.uint8, device=device), False
        received = exchange_bytes(payload, matrix[rank], matrix[:, rank], self.group, world)
        if ok:
            try:
                spilled = self._unpack([m for m in moves if m.dst == rank], plan.step.table, received, matrix[:, rank])
            except Exception:
                log.exception("layer %d: unpacking spilled copies failed on rank %d; the step runs unspilled",
                              self.layer, rank)
                ok = False
        if not all_ready(ok, self.group, world, device):
            return None
        return spilled, int(matrix.sum()), int(matrix[:, rank].sum())

    def _unpack(
        self, mine: list[CopyMove], table: SlotTable, received: torch.Tensor, recv_sizes: np.ndarray
    ) -> LocalExperts | None:
        """The copies spilled onto this rank (`mine`, slot order) as temporary LocalExperts; None without any."""
        if not mine:
            return None
        staged = stage_copies(mine, self, received, recv_sizes, None)
        slots = np.array([m.slot for m in mine])
        # a table of only the received copies: from_copies reads this rank's slots (gpu, expert, fmt) and nothing else
        spilled_table = SlotTable(table.gpu[slots], table.expert[slots], table.fmt[slots], table.share[slots],
                                  table.num_gpus, table.num_experts)
        return LocalExperts.from_copies(spilled_table, self.rank, [staged[m.slot] for m in mine], self.model.hidden_size,
                                        self.experts.backend)
