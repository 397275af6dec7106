"""Where each copy of a new layer plan comes from: kept in place, made locally, sent by a peer or reloaded.

Pure numpy. Every rank calls `copy_moves` on the same two tables and gets the same list, so the
split sizes of the weight exchange agree on all ranks (gloo aborts on sizes that disagree).
A copy in format f can be made exactly from an old copy of the same expert in f (its bytes) or in
bf16 (quantize it: the full weights are bf16, so quantize(bf16 copy) == quantize(full weight)).
Anything else (say bf16 wanted, only int8 held) is reloaded from the checkpoint on the receiver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnq_ep.balance import FMT_CODE, SlotTable
from rnq_ep.memory import expert_bytes
from rnq_ep.specs import FORMATS, ModelSpec

KINDS = ("keep", "local", "peer", "host")  # no bytes; made on the GPU itself; over a link; from the checkpoint


@dataclass(frozen=True)
class CopyMove:
    """How copy `slot` of the new table is obtained."""

    slot: int  # slot in the new table
    expert: int
    fmt: str
    dst: int  # GPU that holds the new copy
    src: int  # GPU that holds the source copy (dst for keep/local; -1 for host)
    src_slot: int  # slot of the source in the old table (-1 for host)
    kind: str  # one of KINDS


def copy_moves(old: SlotTable, new: SlotTable, model: ModelSpec) -> list[CopyMove]:
    """One move per slot of `new`, in slot order; peer sources chosen to spread bytes over senders."""
    if (old.num_gpus, old.num_experts) != (new.num_gpus, new.num_experts):
        raise ValueError(
            f"tables differ in shape: old {old.num_gpus} GPUs x {old.num_experts} experts, "
            f"new {new.num_gpus} x {new.num_experts}"
        )
    sent = np.zeros(old.num_gpus)  # bytes each GPU sends so far
    moves = []
    bf16 = FMT_CODE["bf16"]
    for s in range(new.num_slots):
        g, e, f = int(new.gpu[s]), int(new.expert[s]), int(new.fmt[s])
        holders = np.flatnonzero(old.expert == e)
        usable = holders[(old.fmt[holders] == f) | (old.fmt[holders] == bf16)]
        here = usable[old.gpu[usable] == g]
        exact_here = here[old.fmt[here] == f]
        if len(exact_here):
            moves.append(CopyMove(s, e, FORMATS[f], g, g, int(exact_here[0]), "keep"))
        elif len(here):
            moves.append(CopyMove(s, e, FORMATS[f], g, g, int(here[0]), "local"))
        elif len(usable):
            pick = int(usable[np.lexsort((old.gpu[usable], sent[old.gpu[usable]]))[0]])
            sent[old.gpu[pick]] += expert_bytes(model, FORMATS[f])
            moves.append(CopyMove(s, e, FORMATS[f], g, int(old.gpu[pick]), pick, "peer"))
        else:
            moves.append(CopyMove(s, e, FORMATS[f], g, -1, -1, "host"))
    return moves


def transfer_matrix(moves: list[CopyMove], model: ModelSpec, num_gpus: int) -> np.ndarray:
    """Bytes each GPU sends each other GPU for the peer moves: [G src, G dst] int64."""
    matrix = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    for move in moves:
        if move.kind == "peer":
            matrix[move.src, move.dst] += expert_bytes(model, move.fmt)
    return matrix


def moved_bytes(moves: list[CopyMove], model: ModelSpec) -> tuple[int, int]:
    """(bytes over links and from the checkpoint, the same if every moved copy were bf16)."""
    moving = [m for m in moves if m.kind in ("peer", "host")]
    return sum(expert_bytes(model, m.fmt) for m in moving), len(moving) * expert_bytes(model, "bf16")
