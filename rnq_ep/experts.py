"""This rank's expert copies: sliced from full expert tensors, quantized on load, one grouped call per format.

Rows arrive sorted by local copy (this rank's slots in table order). Copies of one format may be
interleaved with copies of another, so each format's rows are gathered, run through one grouped
SwiGLU call, and scattered back in place. The torch backend (CPU) computes every copy from fp32
weights dequantised once at load (docs/kernels.md: torch's packed CPU kernels measured slower), so
it runs all copies in one call in copy order, with no gather or scatter. The kernels live in
`rnq_ep.kernels`; nothing here computes a SwiGLU itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from rnq_ep.balance import SlotTable
from rnq_ep.quant import QuantWeight, dequantize, quantize
from rnq_ep.specs import FORMATS

BACKENDS = ("auto", "triton", "torch")
# a rank's own experts' weights: expert -> (gate_up [2I, H], down [H, I]), loaded as each local copy is built
ExpertWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor]] | Mapping[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class DenseCopies:
    """Every local copy's weights dequantised to fp32, in local copy order: what the torch backend computes with."""

    w_gate_up: torch.Tensor  # [C, 2I, H]
    w_down: torch.Tensor  # [C, H, I]
    gate_up_bias: torch.Tensor | None  # [C, 2I]
    down_bias: torch.Tensor | None  # [C, H]


@dataclass(frozen=True)
class FormatGroup:
    """The local copies stored in one format, stacked in local copy order."""

    fmt: str
    copies: torch.Tensor  # [G] int64 local copy indices
    stored_gate_up: QuantWeight  # [G, 2I, H] the bytes a copy is made of (kernels read them, migration sends them)
    stored_down: QuantWeight  # [G, H, I]
    gate_up_bias: torch.Tensor | None = None  # [G, 2I] fp32, never quantized (GPT-OSS)
    down_bias: torch.Tensor | None = None  # [G, H] fp32


class LocalExperts:
    """The expert copies that `table` places on `rank`, grouped by storage format."""

    activation = "silu"  # the gating of every copy; copies from from_copies are plain SwiGLU without biases

    def __init__(
        self,
        table: SlotTable,
        rank: int,
        w_gate_up: torch.Tensor | ExpertWeights,
        w_down: torch.Tensor | None,
        backend: str = "auto",
        activation: str = "silu",
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
        hidden_size: int | None = None,
    ) -> None:
        """Keep this rank's slots of w_gate_up [E, 2I, H] and w_down [E, H, I], quantized per slot.

        Or w_gate_up = the rank's own experts' weights (expert -> (gate_up [2I, H], down [H, I]), a
        mapping or a callable, read once per local copy), w_down = None and hidden_size = H.
        `activation` "swiglu-oai" (GPT-OSS) or biases gate_up_bias [E, 2I] / down_bias [E, H] run
        on the torch backend only: "auto" picks it, "triton" raises NotImplementedError.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown expert backend {backend!r}, expected one of {BACKENDS}")
        weights_of, hidden = _expert_weights(table.num_experts, w_gate_up, w_down, hidden_size)
        if activation != "silu" or gate_up_bias is not None or down_bias is not None:
            backend = _torch_only(backend, activation)
            self.activation = activation
        self._place(table, rank, backend, hidden, on_gpu=False)  # the backend is picked below, from the loaded copies
        self.groups = [
            self._load_group(FORMATS[code], np.flatnonzero(table.fmt[self.slots] == code), weights_of)
            for code in sorted(set(table.fmt[self.slots].tolist()))
        ]
        on_gpu = w_gate_up.is_cuda if isinstance(w_gate_up, torch.Tensor) else any(
            group.stored_gate_up.data.is_cuda for group in self.groups)
        self.backend = ("triton" if on_gpu else "torch") if backend == "auto" else backend
        if gate_up_bias is not None or down_bias is not None:
            self.groups = [self._with_biases(group, gate_up_bias, down_bias) for group in self.groups]
        self.dense = self._dense() if self.backend == "torch" else None

    def _with_biases(
        self, group: FormatGroup, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None
    ) -> FormatGroup:
        """`group` with its copies' rows of gate_up_bias [E, 2I] and down_bias [E, H], in fp32."""
        experts = torch.as_tensor(self.experts[group.copies.numpy()])
        return replace(
            group,
            gate_up_bias=None if gate_up_bias is None else gate_up_bias[experts.to(gate_up_bias.device)].float(),
            down_bias=None if down_bias is None else down_bias[experts.to(down_bias.device)].float(),
        )

    @classmethod
    def from_copies(
        cls,
        table: SlotTable,
        rank: int,
        copies: list[tuple[QuantWeight, QuantWeight]],
        hidden_size: int,
        backend: str = "auto",
    ) -> LocalExperts:
        """This rank's experts from per-copy stored weights (gate_up [2I, H], down [H, I]), one per local slot in table order."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown expert backend {backend!r}, expected one of {BACKENDS}")
        experts = cls.__new__(cls)
        local_count = int(np.count_nonzero(table.gpu == rank))
        if len(copies) != local_count:
            raise ValueError(f"rank {rank} holds {local_count} copies in the table, got weights for {len(copies)}")
        experts._place(table, rank, backend, hidden_size, bool(copies) and copies[0][0].data.is_cuda)
        experts.groups = []
        for code in sorted(set(table.fmt[experts.slots].tolist())):
            members = np.flatnonzero(table.fmt[experts.slots] == code)
            for j in members:
                if copies[j][0].fmt != FORMATS[code] or copies[j][1].fmt != FORMATS[code]:
                    raise ValueError(f"local copy {j} is stored as {copies[j][0].fmt}, the table says {FORMATS[code]}")
            gate_up = _stack([copies[j][0] for j in members])
            down = _stack([copies[j][1] for j in members])
            experts.groups.append(FormatGroup(FORMATS[code], torch.as_tensor(members, dtype=torch.int64), gate_up, down))
        experts.dense = experts._dense() if experts.backend == "torch" else None
        return experts

    def _place(self, table: SlotTable, rank: int, backend: str, hidden: int, on_gpu: bool) -> None:
        """Bookkeeping shared by both constructors: backend, this rank's slots and their experts."""
        self.backend = ("triton" if on_gpu else "torch") if backend == "auto" else backend
        self.rank = rank
        self.hidden_size = hidden
        self.slots = np.flatnonzero(table.gpu == rank)  # slot ids of this rank, in table order
        self.experts = table.expert[self.slots]  # [C] logical expert of each local copy

    def copy_weights(self, copy: int) -> tuple[QuantWeight, QuantWeight]:
        """Stored (gate_up [2I, H], down [H, I]) of local copy `copy`: views, no new memory."""
        for group in self.groups:
            hit = torch.nonzero(group.copies == copy)
            if len(hit):
                j = int(hit[0, 0])
                return _take(group.stored_gate_up, j), _take(group.stored_down, j)
        raise IndexError(f"local copy {copy} out of range: this rank holds {self.num_copies} copies")

    @property
    def num_copies(self) -> int:
        """Copies C on this rank."""
        return len(self.slots)

    def check_rebuildable(self, what: str) -> None:
        """Raise NotImplementedError naming `what` unless the copies are plain SwiGLU without biases, the only kind
        `from_copies` rebuilds (migration and spilling move copies as weights alone)."""
        if self.activation != "silu" or any(g.gate_up_bias is not None or g.down_bias is not None for g in self.groups):
            raise NotImplementedError(
                f"{what} a layer with activation {self.activation!r} or expert biases (GPT-OSS) is not supported: "
                "moved copies are rebuilt as plain SwiGLU without biases"
            )

    def _load_group(
        self, fmt: str, copies: np.ndarray, weights_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    ) -> FormatGroup:
        """Read the copies' experts one at a time, store each in `fmt` (per-row / per-group scales: the same bytes as
        quantizing them stacked) and stack them: gate_up [G, 2I, H], down [G, H, I]."""
        stored = []
        for expert in self.experts[copies].tolist():
            gate_up, down = weights_of(expert)
            if gate_up.shape != (2 * down.shape[-1], self.hidden_size) or down.shape[0] != self.hidden_size:
                raise ValueError(
                    f"expert {expert}: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not match "
                    f"[2I, H] and [H, I] with H = {self.hidden_size}"
                )
            stored.append((quantize(gate_up, fmt), quantize(down, fmt)))
        gate_up_stack, down_stack = _stack([s[0] for s in stored]), _stack([s[1] for s in stored])
        return FormatGroup(fmt, torch.as_tensor(copies, dtype=torch.int64), gate_up_stack, down_stack)

    def _dense(self) -> DenseCopies | None:
        """Every group's copies dequantised into one fp32 stack, format-major (the order rows arrive in: the
        torch backend's weights); None without copies."""
        if not self.groups:
            return None

        def stacked(parts: list[torch.Tensor | None]) -> torch.Tensor | None:  # each group's [G, ...] -> [C, ...] fp32
            return None if parts[0] is None else torch.cat([part.float() for part in parts])

        return DenseCopies(
            stacked([dequantize(g.stored_gate_up) for g in self.groups]),
            stacked([dequantize(g.stored_down) for g in self.groups]),
            stacked([g.gate_up_bias for g in self.groups]),
            stacked([g.down_bias for g in self.groups]),
        )

    def forward(self, recv: torch.Tensor, local_offsets: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
        """[N, H] rows sorted by local copy, format-major (the groups in order; local_offsets [C+1]) ->
        row_weight-scaled SwiGLU outputs [N, H]. Each format is one grouped call over its run of rows."""
        if local_offsets.numel() != self.num_copies + 1:
            raise ValueError(f"local_offsets has {local_offsets.numel()} entries, expected C+1 = {self.num_copies + 1}")
        if recv.shape[-1] != self.hidden_size:
            raise ValueError(f"received rows have hidden size {recv.shape[-1]}, experts expect {self.hidden_size}")
        out = torch.empty_like(recv)
        if recv.shape[0] == 0:
            return out
        offsets = local_offsets.to(device=recv.device, dtype=torch.int64)
        if self.dense is not None:
            from rnq_ep.kernels.reference import grouped_swiglu_op  # kernels pull in triton: import late

            d = self.dense
            return grouped_swiglu_op(
                recv, d.w_gate_up, d.w_down, offsets, row_weight, self.activation, d.gate_up_bias, d.down_bias
            ).to(recv.dtype)
        if len(self.groups) == 1:
            return self._run(self.groups[0], recv, offsets, row_weight)
        start = 0
        for group in self.groups:  # every call writes only its own rows of `out`: no gather, no scatter
            end = start + len(group.copies)
            self._run(group, recv, offsets[start : end + 1], row_weight, out)
            start = end
        return out

    __call__ = forward

    def _run(
        self, group: FormatGroup, x: torch.Tensor, offsets: torch.Tensor, row_weight: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One Triton grouped SwiGLU call over a format's copies, rows offsets[0]:offsets[-1] of x [N, H] -> [N, H]."""
        from rnq_ep.kernels import grouped_swiglu  # imported here: it pulls in triton, which the torch backend does not need

        return grouped_swiglu(x, group.stored_gate_up, group.stored_down, offsets.to(torch.int32), row_weight, out=out)


def _expert_weights(
    num_experts: int, w_gate_up: torch.Tensor | ExpertWeights, w_down: torch.Tensor | None, hidden_size: int | None
) -> tuple[Callable[[int], tuple[torch.Tensor, torch.Tensor]], int]:
    """(expert -> (gate_up [2I, H], down [H, I]), H) from full tensors [E, 2I, H] / [E, H, I] or a rank's own weights."""
    if not isinstance(w_gate_up, torch.Tensor):
        if w_down is not None or hidden_size is None:
            raise ValueError("with per-expert weights (a mapping or callable) give w_down=None and hidden_size")
        return (w_gate_up.__getitem__ if isinstance(w_gate_up, Mapping) else w_gate_up), hidden_size
    if w_down is None or w_gate_up.dim() != 3 or w_down.dim() != 3 or w_gate_up.shape[0] != num_experts:
        raise ValueError(
            f"expert weights must be w_gate_up [E={num_experts}, 2I, H] and w_down [E, H, I], "
            f"got {tuple(w_gate_up.shape)} and {None if w_down is None else tuple(w_down.shape)}"
        )
    hidden, inter = w_down.shape[1], w_down.shape[2]
    if w_gate_up.shape[1:] != (2 * inter, hidden) or w_down.shape[0] != num_experts:
        raise ValueError(
            f"w_gate_up {tuple(w_gate_up.shape)} does not match w_down {tuple(w_down.shape)}: "
            f"expected [E, 2I, H] = [{num_experts}, {2 * inter}, {hidden}]"
        )
    return (lambda expert: (w_gate_up[expert], w_down[expert])), hidden


def _torch_only(backend: str, activation: str) -> str:
    """The backend for experts the Triton kernels do not compute (another activation, biases): torch."""
    from rnq_ep.kernels.reference import check_activation  # imports triton: only for these experts

    check_activation(activation)
    if backend == "triton":
        raise NotImplementedError(
            f"the Triton expert kernels compute plain SwiGLU without biases; activation {activation!r} or expert "
            "biases need backend='torch' (backend='auto' picks it)"
        )
    return "torch"


def _take(q: QuantWeight, j: int) -> QuantWeight:
    """Copy j of a stacked weight [G, N, K] as a view [N, K]."""
    return QuantWeight(q.fmt, q.data[j], None if q.scale is None else q.scale[j], q.shape[1:])


def _stack(weights: list[QuantWeight]) -> QuantWeight:
    """Stack same-format weights [N, K] into [G, N, K] (new memory)."""
    first = weights[0]
    scale = None if first.scale is None else torch.stack([w.scale for w in weights])
    return QuantWeight(first.fmt, torch.stack([w.data for w in weights]), scale, (len(weights), *first.shape))
