"""Move one layer to a new slot table on all ranks: exchange only the changed copies, switch when all are staged.

A LayerMigration stages the changed copies in chunks, one chunk per call of advance() (one call
between two serving steps), so no step waits for a whole layer. Every rank computes the same moves
and chunks, so each call makes the same collectives on every rank, whatever fails locally:
  all_to_all_single(uint8 payload)   per chunk with a peer move; split sizes from transfer_matrix, shared
  all_reduce(ready flag, MIN)        after the last chunk: the layer switches only if every rank is ready
A rank whose packing or staging raises sends zeros of the agreed size from then on and votes 0, so
no rank switches alone and none is left blocked in a collective. The old copies keep serving until
the switch (staging only reads them). Staging bound per rank: the changed copies it receives or
makes (in their target formats) plus one chunk's send and receive buffers (`peak_staging_bytes`,
tested against that bound) plus, at the switch, the new layer's local copies restacked, on top of
the old layer's copies; the old ones are freed at the switch, and one layer moves at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rnq_ep.balance import SlotTable
from rnq_ep.dispatch import world_size
from rnq_ep.experts import LocalExperts
from rnq_ep.layer import EPMoE
from rnq_ep.memory import INT4_GROUP
from rnq_ep.quant import QuantWeight, quantize
from rnq_ep.rebalance.moves import CopyMove, copy_moves, transfer_matrix

log = logging.getLogger(__name__)

ExpertLoader = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # expert -> full (gate_up [2I, H], down [H, I])
FaultHook = Callable[[str], None]  # called with "pack" and "stage"; tests raise from it


@dataclass(frozen=True)
class LayerMove:
    """What moving one layer did on this rank."""

    layer: int
    switched: bool  # every rank staged it and the layer now serves the new table
    bytes_sent: int  # this rank's payload to other ranks
    bytes_received: int
    copies_moved: int  # peer + host copies in the whole layer (all ranks)


class LayerMigration:
    """A staged move of one layer to `new_table`: advance() once per step, `copies_per_step` changed copies each."""

    def __init__(
        self,
        layer: EPMoE,
        new_table: SlotTable,
        load_expert: ExpertLoader | None = None,
        fault: FaultHook | None = None,
        copies_per_step: int = 0,
    ) -> None:
        """Plan the moves (the same on every rank); 0 copies_per_step stages the whole layer in one call."""
        layer.experts.check_rebuildable("migrating")
        self.layer, self.new_table, self.load_expert, self.fault = layer, new_table, load_expert, fault
        self.world = world_size(layer.group)
        self.device = layer_device(layer)
        self.moves = copy_moves(layer.table, new_table, layer.model)
        changed = [m for m in self.moves if m.kind != "keep"]  # kept copies cost nothing: staged at the switch
        size = copies_per_step or max(len(changed), 1)
        self.chunks = [changed[i : i + size] for i in range(0, len(changed), size)] or [[]]
        self.staged: dict[int, tuple[QuantWeight, QuantWeight]] = {}  # new slot -> stored weights (spare buffers)
        self.ready = True
        self.bytes_sent = self.bytes_received = 0
        self.peak_staging_bytes = 0  # most bytes held at once for the move: staged copies + one chunk's buffers

    def advance(self) -> LayerMove | None:
        """Stage the next chunk (one exchange, skipped when no rank sends); after the last, vote and switch."""
        chunk = self.chunks.pop(0)
        matrix = transfer_matrix(chunk, self.layer.model, self.world)  # [src, dst] bytes, the same on every rank
        rank = self.layer.rank
        send_sizes, recv_sizes = matrix[rank].copy(), matrix[:, rank].copy()
        if self.ready:
            try:
                if self.fault is not None:
                    self.fault("pack")
                payload = pack_copies([m for m in chunk if m.kind == "peer" and m.src == rank], self.layer, self.device)
            except Exception:
                log.exception("layer %d: packing copies failed on rank %d; old plan stays", self.layer.layer, rank)
                self.ready = False
        if not self.ready:
            payload = torch.zeros(int(send_sizes.sum()), dtype=torch.uint8, device=self.device)
        received = exchange_bytes(payload, send_sizes, recv_sizes, self.layer.group, self.world) if matrix.any() else payload[:0]
        self.bytes_sent += int(send_sizes.sum())
        self.bytes_received += int(recv_sizes.sum())
        if self.ready:
            try:
                if self.fault is not None:
                    self.fault("stage")
                self.staged.update(stage_copies([m for m in chunk if m.dst == rank], self.layer, received, recv_sizes, self.load_expert))
                held = sum(t.nbytes for pair in self.staged.values() for w in pair for t in _tensors(w))
                self.peak_staging_bytes = max(self.peak_staging_bytes, held + payload.nbytes + received.nbytes)
            except Exception:
                log.exception("layer %d: staging copies failed on rank %d; old plan stays", self.layer.layer, rank)
                self.ready = False
        return None if self.chunks else self._switch()

    def _switch(self) -> LayerMove:
        """Build the new local experts from the staged and kept copies; switch iff every rank is ready."""
        layer, rank = self.layer, self.layer.rank
        experts = None
        if self.ready:
            try:
                kept = [m for m in self.moves if m.kind == "keep" and m.dst == rank]
                self.staged.update(stage_copies(kept, layer, torch.zeros(0, dtype=torch.uint8), np.zeros(self.world), None))
                copies = [self.staged[s] for s in np.flatnonzero(self.new_table.gpu == rank)]
                experts = LocalExperts.from_copies(self.new_table, rank, copies, layer.model.hidden_size, layer.experts.backend)
            except Exception:
                log.exception("layer %d: building the new copies failed on rank %d; old plan stays", layer.layer, rank)
                self.ready = False
        switched = all_ready(self.ready, layer.group, self.world, self.device)
        if switched:
            layer.switch_plan(self.new_table, experts)
        self.staged.clear()
        moved = sum(m.kind in ("peer", "host") for m in self.moves)
        return LayerMove(layer.layer, switched, self.bytes_sent, self.bytes_received, moved)


def migrate_layer(
    layer: EPMoE,
    new_table: SlotTable,
    load_expert: ExpertLoader | None = None,
    fault: FaultHook | None = None,
) -> LayerMove:
    """Stage all of `layer`'s changed copies at once and switch to `new_table` if all ranks staged it."""
    migration = LayerMigration(layer, new_table, load_expert, fault)
    while (moved := migration.advance()) is None:
        pass
    return moved


def layer_device(layer: EPMoE) -> torch.device:
    """Where the layer's copies live (a rank without copies: its current GPU, or the CPU)."""
    if layer.experts.groups:
        return layer.experts.groups[0].stored_gate_up.data.device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def pack_copies(sends: list[CopyMove], layer: EPMoE, device: torch.device) -> torch.Tensor:
    """This rank's outgoing copies as one uint8 buffer, by destination then move order."""
    local_of_slot = {int(slot): j for j, slot in enumerate(layer.experts.slots)}
    parts = []
    for move in sorted(sends, key=lambda m: m.dst):  # stable: move order within a destination
        gate_up, down = layer.experts.copy_weights(local_of_slot[move.src_slot])
        for weight in (gate_up, down):
            parts.extend(_bytes_of(_convert(weight, move.fmt)))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=device)


def stage_copies(
    moves: list[CopyMove],
    layer: EPMoE,
    received: torch.Tensor,
    recv_sizes: np.ndarray,
    load_expert: ExpertLoader | None,
) -> dict[int, tuple[QuantWeight, QuantWeight]]:
    """Stored weights of the given moves into this rank (new slot -> weights), from kept, local, received or reloaded copies."""
    model = layer.model
    h, i = model.hidden_size, model.moe_intermediate_size
    local_of_slot = {int(slot): j for j, slot in enumerate(layer.experts.slots)}
    offsets = np.concatenate([[0], np.cumsum(recv_sizes)])  # start of each source's block
    copies = {}
    for move in moves:
        if move.kind in ("keep", "local"):
            gate_up, down = layer.experts.copy_weights(local_of_slot[move.src_slot])
            copies[move.slot] = (_convert(gate_up, move.fmt), _convert(down, move.fmt))
        elif move.kind == "peer":
            start = int(offsets[move.src])
            gate_up, start = _unpack(received, start, move.fmt, 2 * i, h)
            down, start = _unpack(received, start, move.fmt, h, i)
            offsets[move.src] = start
            copies[move.slot] = (gate_up, down)
        else:
            if load_expert is None:
                raise RuntimeError(
                    f"layer {layer.layer}: expert {move.expert} in {move.fmt} has no exact source on any rank "
                    "(only lower-precision copies) and no checkpoint loader was given"
                )
            full_gate_up, full_down = load_expert(move.expert)
            copies[move.slot] = (quantize(full_gate_up, move.fmt), quantize(full_down, move.fmt))
    return copies


def _convert(weight: QuantWeight, fmt: str) -> QuantWeight:
    """The copy in `fmt`: itself, or quantized from bf16 (exact, as the full weight is bf16)."""
    if weight.fmt == fmt:
        return weight
    if weight.fmt != "bf16":
        raise ValueError(f"cannot make an exact {fmt} copy from a {weight.fmt} copy")
    return quantize(weight.data, fmt)


def _layout(fmt: str, n: int, k: int) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of the data and scale tensors of a weight [n, k] stored in `fmt`."""
    if fmt == "bf16":
        return [(torch.bfloat16, (n, k))]
    if fmt == "int8":
        return [(torch.int8, (n, k)), (torch.float32, (n,))]
    return [(torch.uint8, (n, (k + 1) // 2)), (torch.float16, (n, math.ceil(k / INT4_GROUP)))]


def _tensors(weight: QuantWeight) -> list[torch.Tensor]:
    """Data then scale (if any) of a stored weight."""
    return [weight.data] if weight.scale is None else [weight.data, weight.scale]


def _bytes_of(weight: QuantWeight) -> list[torch.Tensor]:
    """Data then scale of a weight, each as flat uint8."""
    return [t.contiguous().reshape(-1).view(torch.uint8) for t in _tensors(weight)]


def _unpack(buffer: torch.Tensor, start: int, fmt: str, n: int, k: int) -> tuple[QuantWeight, int]:
    """The weight [n, k] in `fmt` stored at buffer[start:], and the offset after it."""
    tensors = []
    for dtype, shape in _layout(fmt, n, k):
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        tensors.append(buffer[start : start + size].clone().view(dtype).reshape(shape))  # clone: aligned storage
        start += size
    return QuantWeight(fmt, tensors[0], tensors[1] if len(tensors) > 1 else None, (n, k)), start


def exchange_bytes(
    payload: torch.Tensor, send_sizes: np.ndarray, recv_sizes: np.ndarray, group: dist.ProcessGroup | None, world: int
) -> torch.Tensor:
    """One uneven all-to-all of uint8 bytes (nothing to do alone): [sum send] -> [sum recv]."""
    received = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8, device=payload.device)
    if world > 1:
        dist.all_to_all_single(received, payload, recv_sizes.tolist(), send_sizes.tolist(), group=group)
    return received


def all_ready(ready: bool, group: dist.ProcessGroup | None, world: int, device: torch.device) -> bool:
    """True on every rank iff every rank is ready (one all_reduce MIN)."""
    if world == 1:
        return ready
    flag = torch.tensor([int(ready)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
