"""Symmetric weight quantization of expert projections: bf16, int8 (w8a16), int4 (w4a16).

Layout of a weight [..., N, K] (N output channels, K input features; transformers MoE
`gate_up_proj` is [E, 2I, H], `down_proj` is [E, H, I]):
- int8: q = round(w / s) in [-127, 127], one fp32 scale s per output channel.
- int4: q = round(w / s) in [-7, 7], one fp16 scale per (output channel, group of INT4_GROUP
  along K); stored as q + 8 in a nibble, two per uint8 along K (low nibble = even k), K padded
  with zeros to even.
Byte counts equal `rnq_ep.memory.projection_bytes`. Pure torch: no GPU, no torch.distributed;
this module does not import rnq_ep.memory so the kernel benchmark runs without msgspec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMATS = ("bf16", "int8", "int4")
INT4_GROUP = 128  # must equal rnq_ep.memory.INT4_GROUP (a test checks)
INT4_ZERO = 8  # stored nibble = q + INT4_ZERO
_INT8_MAX = 127
_INT4_MAX = 7
_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest fp16 subnormal: a scale must not round to zero


@dataclass(frozen=True)
class QuantWeight:
    """A weight [..., N, K] in one storage format; see the module docstring for the layout."""

    fmt: str
    data: torch.Tensor  # bf16 [..., N, K] | int8 [..., N, K] | uint8 [..., N, ceil(K/2)]
    scale: torch.Tensor | None  # None | fp32 [..., N] | fp16 [..., N, ceil(K/INT4_GROUP)]
    shape: tuple[int, ...]  # logical [..., N, K]


def quantize(w: torch.Tensor, fmt: str) -> QuantWeight:
    """Quantize w [..., N, K] (any float dtype) symmetrically into `fmt`."""
    if w.dim() < 2:
        raise ValueError(f"quantize expects a weight [..., N, K], got shape {tuple(w.shape)}")
    shape = tuple(w.shape)
    if fmt == "bf16":
        return QuantWeight("bf16", w.to(torch.bfloat16).contiguous(), None, shape)
    w32 = w.detach().to(torch.float32)
    if fmt == "int8":
        scale = w32.abs().amax(dim=-1) / _INT8_MAX  # [..., N]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w32 / safe[..., None]).clamp(-_INT8_MAX, _INT8_MAX)
        return QuantWeight("int8", q.to(torch.int8).contiguous(), scale.contiguous(), shape)
    if fmt == "int4":
        return _quantize_int4(w32, shape)
    raise ValueError(f"unknown weight format {fmt!r}, expected one of {FORMATS}")


def _quantize_int4(w32: torch.Tensor, shape: tuple[int, ...]) -> QuantWeight:
    k = shape[-1]
    groups = math.ceil(k / INT4_GROUP)
    padded = torch.nn.functional.pad(w32, (0, groups * INT4_GROUP - k))  # [..., N, groups*128]
    grouped = padded.unflatten(-1, (groups, INT4_GROUP))  # [..., N, groups, 128]
    amax = grouped.abs().amax(dim=-1)  # [..., N, groups]
    # round the scale to fp16 first so quantize and dequantize use the same scale
    scale = (amax / _INT4_MAX).clamp(max=_FP16_MAX).to(torch.float16)
    scale = torch.where((amax > 0) & (scale == 0), torch.full_like(scale, _FP16_TINY), scale)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(amax))
    q = torch.round(grouped / safe[..., None]).clamp(-_INT4_MAX, _INT4_MAX)
    q = q.flatten(-2)[..., : k + (k % 2)]  # [..., N, K rounded up to even]
    nibbles = (q + INT4_ZERO).to(torch.uint8)
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # [..., N, ceil(K/2)]
    return QuantWeight("int4", packed.contiguous(), scale.contiguous(), shape)


def dequantize(q: QuantWeight) -> torch.Tensor:
    """The fp32 weight [..., N, K] that `q` represents."""
    if q.fmt == "bf16":
        return q.data.to(torch.float32)
    if q.fmt == "int8":
        return q.data.to(torch.float32) * q.scale[..., None]
    if q.fmt == "int4":
        k = q.shape[-1]
        low = (q.data & 0xF).to(torch.float32)
        high = (q.data >> 4).to(torch.float32)
        values = torch.stack((low, high), dim=-1).flatten(-2)[..., :k] - INT4_ZERO  # [..., N, K]
        scale = q.scale.to(torch.float32).repeat_interleave(INT4_GROUP, dim=-1)[..., :k]
        return values * scale
    raise ValueError(f"unknown weight format {q.fmt!r}, expected one of {FORMATS}")


def nbytes(q: QuantWeight) -> int:
    """Bytes stored for `q` (data + scales); equals memory.projection_bytes summed over leading dims."""
    scale_bytes = 0 if q.scale is None else q.scale.numel() * q.scale.element_size()
    return q.data.numel() * q.data.element_size() + scale_bytes


def relative_error(w: torch.Tensor, fmt: str) -> float:
    """||w - dequantize(quantize(w))||_F / ||w||_F for a weight [..., N, K]."""
    w32 = w.to(torch.float32)
    return float(torch.linalg.vector_norm(dequantize(quantize(w32, fmt)) - w32) / torch.linalg.vector_norm(w32))


def error_table(rows: int = 512, cols: int = 1024, seed: int = 0) -> dict[tuple[str, str], float]:
    """Relative error per (distribution, fmt) on a [rows, cols] weight: normal and Student-t (df=3)."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=gen)
    chi2 = 2.0 * torch._standard_gamma(torch.full((rows, cols), 1.5), generator=gen)  # chi-square, df=3
    heavy = torch.randn(rows, cols, generator=gen) / torch.sqrt(chi2 / 3.0)
    weights = {"normal": normal, "student-t3": heavy}
    return {(dist, fmt): relative_error(w, fmt) for dist, w in weights.items() for fmt in ("int8", "int4")}
