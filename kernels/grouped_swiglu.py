"""Grouped SwiGLU over expert copies in bf16, int8 (w8a16) or int4 (w4a16) weights, in Triton.

Two launches per call: (1) gate and up GEMMs as one tile (gate and up weight rows interleaved
as columns, so x is read once) with silu(gate) * up in the epilogue, writing a bf16 [N, I]
intermediate; (2) the down GEMM with the optional per-row weight in the epilogue.
Tiles are (row block, column block); a row block belongs to one group through the block map of
`align.py`. Weights are dequantised in registers: int8 values go to the MMA as exact bf16 and
the per-channel scale multiplies the accumulator; int4 bytes are unpacked into low/high
nibbles (even/odd k), turned into bf16 by bit tricks, and multiplied by the even/odd columns of
the x tile (two MMAs); each k tile, which lies inside one group of 128, is scaled after its
MMAs. Accumulation is fp32.

Without CUDA the kernels run in Triton's CPU interpreter (the package __init__ sets
TRITON_INTERPRET). The interpreter computes bf16 dots wrongly (triton-lang/triton#11584), so
when interpreted the operands are upcast to fp32 before tl.dot (constexpr UPCAST).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from rnq_ep.kernels.align import block_map, max_blocks
from rnq_ep.quant import INT4_GROUP, INT4_ZERO, QuantWeight

_FMT_CODE = {"bf16": 0, "int8": 1, "int4": 2}


class Blocks(NamedTuple):
    """Tile sizes and launch options of both GEMMs (block_m also sizes the block map)."""

    block_m: int
    block_n: int
    block_k: int  # must divide INT4_GROUP so an int4 k tile has one scale
    num_warps: int
    num_stages: int


# decode: few rows per expert, weight-streaming bound -> thin row blocks, long k tiles;
# prefill: many rows per expert, MMA bound -> square-ish tiles; interpreter: small and cheap.
DECODE_BLOCKS = Blocks(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4)
PREFILL_BLOCKS = Blocks(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)
INTERPRETER_BLOCKS = Blocks(block_m=16, block_n=64, block_k=64, num_warps=1, num_stages=1)
DECODE_MAX_ROWS_PER_GROUP = 32


def choose_blocks(num_rows: int, num_groups: int, interpreted: bool) -> Blocks:
    """Block sizes for the shape class of num_rows rows over num_groups groups (host-known, no sync)."""
    if interpreted:
        return INTERPRETER_BLOCKS
    return DECODE_BLOCKS if num_rows <= DECODE_MAX_ROWS_PER_GROUP * num_groups else PREFILL_BLOCKS


@triton.jit
def _project(
    a_ptr, rows, row_mask, stride_am, K,
    w_ptr, stride_wn, s_ptr, stride_sn, cols, col_mask,
    FMT: tl.constexpr, UPCAST: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] = A[rows, :K] @ W[cols, :K]^T with W dequantised (one group's W; cols: [BLOCK_N])."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + ks[None, :], mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)  # [BM, BK]
        if UPCAST:
            a = a.to(tl.float32)
        if FMT == 2:
            # the byte of k pairs (2p, 2p + 1): multiply even/odd columns of A by low/high nibbles n.
            # bf16 bits 0x4300 | n are exactly 128 + n (no int->float convert, which would bound
            # the loop), so A (n - ZERO) = A (128 + n) - (128 + ZERO) * rowsum(A), per k tile
            a_even, a_odd = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
            pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_cols + pairs[:, None], mask=col_mask[None, :] & (2 * pairs[:, None] < K), other=0)
            low = ((packed & 0xF).to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True).to(a.dtype)  # [BK/2, BN]
            high = ((packed >> 4).to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True).to(a.dtype)
            biased = tl.dot(a_odd, high, tl.dot(a_even, low))  # [BM, BN]
            part = biased - (128 + ZERO) * tl.sum(a.to(tl.float32), axis=1)[:, None]
            scale = tl.load(s_ptr + cols * stride_sn + k0 // GROUP, mask=col_mask, other=0.0)  # one group per k tile
            acc += part * scale.to(tl.float32)[None, :]
        else:
            w = tl.load(w_cols + ks[:, None], mask=col_mask[None, :] & (ks[:, None] < K), other=0)  # [BK, BN]
            acc = tl.dot(a, w.to(a.dtype), acc)
    if FMT == 1:  # per output channel: scales the accumulator
        acc *= tl.load(s_ptr + cols * stride_sn, mask=col_mask, other=0.0)[None, :]
    return acc


@triton.jit
def _grouped_swiglu_kernel(
    a_ptr, w_ptr, s_ptr, out_ptr, row_weight_ptr, offsets_ptr, block_group_ptr, block_row_ptr,
    K, N_OUT, stride_am, stride_wg, stride_wn, stride_sg, stride_sn, stride_om,
    GATE_UP: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    FMT: tl.constexpr, UPCAST: tl.constexpr, GROUP: tl.constexpr, ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (row block, column block) tile: silu(A Wg^T) * (A Wu^T) if GATE_UP else A Wd^T (* row weight)."""
    group = tl.load(block_group_ptr + tl.program_id(0))
    if group < 0:  # past the real block count (the grid is an upper bound)
        return
    rows = tl.load(block_row_ptr + tl.program_id(0)) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(offsets_ptr + group + 1)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N_OUT
    w_group = w_ptr + group.to(tl.int64) * stride_wg
    s_group = s_ptr + group.to(tl.int64) * stride_sg
    if GATE_UP:
        # one [BLOCK_M, 2 * BLOCK_N] tile whose columns interleave gate row c and up row N_OUT + c,
        # so x is read once for both and the epilogue splits them apart
        pair = tl.arange(0, 2 * BLOCK_N)
        w_rows = tl.program_id(1) * BLOCK_N + pair // 2 + (pair % 2) * N_OUT
        w_mask = tl.program_id(1) * BLOCK_N + pair // 2 < N_OUT
        both = _project(a_ptr, rows, row_mask, stride_am, K, w_group, stride_wn, s_group, stride_sn, w_rows, w_mask,
                        FMT, UPCAST, GROUP, ZERO, BLOCK_M, 2 * BLOCK_N, BLOCK_K)
        gate, up = tl.split(tl.reshape(both, (BLOCK_M, BLOCK_N, 2)))
        acc = gate * tl.sigmoid(gate) * up
    else:
        acc = _project(a_ptr, rows, row_mask, stride_am, K, w_group, stride_wn, s_group, stride_sn, cols, col_mask,
                       FMT, UPCAST, GROUP, ZERO, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_ROW_WEIGHT:
        acc *= tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0)[:, None]
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(tl.bfloat16), mask=row_mask[:, None] & col_mask[None, :])


_INTERPRETED = isinstance(_grouped_swiglu_kernel, InterpretedFunction)


def _launch(a, w, out, row_weight, offsets, block_group, block_row, gate_up: bool, blocks: Blocks) -> None:
    n_out = out.shape[1]
    scale = w.data if w.scale is None else w.scale  # unread for bf16 (FMT is constexpr)
    scale_strides = (0, 0) if w.scale is None else (w.scale.stride(0), w.scale.stride(1))
    grid = (block_group.numel(), triton.cdiv(n_out, blocks.block_n))
    _grouped_swiglu_kernel[grid](
        a, w.data, scale, out, a if row_weight is None else row_weight, offsets, block_group, block_row,
        a.shape[1], n_out, a.stride(0), w.data.stride(0), w.data.stride(1), *scale_strides, out.stride(0),
        GATE_UP=gate_up, HAS_ROW_WEIGHT=row_weight is not None, FMT=_FMT_CODE[w.fmt], UPCAST=_INTERPRETED,
        GROUP=INT4_GROUP, ZERO=INT4_ZERO, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )


def grouped_swiglu(
    x: torch.Tensor,
    w_gate_up: QuantWeight,
    w_down: QuantWeight,
    offsets: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    *,
    blocks: Blocks | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """bf16 [N, H]: rows offsets[g]:offsets[g+1] of x [N, H] bf16 through copy g of w_gate_up [G, 2I, H], w_down [G, H, I].

    Offsets are absolute rows of x (they need not start at 0); `out` (bf16 [N, H]): write those rows there, leave
    the others, so each format's call fills its own run of one shared buffer."""
    _check_inputs(x, w_gate_up, w_down, offsets, row_weight)
    if not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("grouped_swiglu on CPU tensors needs TRITON_INTERPRET=1 set before triton is first imported")
    num_rows, num_groups = x.shape[0], w_gate_up.shape[0]
    blocks = blocks or choose_blocks(num_rows, num_groups, _INTERPRETED)
    if INT4_GROUP % blocks.block_k:
        raise ValueError(f"block_k {blocks.block_k} must divide the int4 group {INT4_GROUP}")
    if out is None:
        out = torch.empty_like(x)  # [N, H]
    elif out.shape != x.shape or out.dtype != torch.bfloat16 or out.stride(1) != 1:
        raise ValueError(f"out must be bf16 {tuple(x.shape)} with unit column stride, got {out.dtype} {tuple(out.shape)}")
    if num_rows == 0:
        return out
    offsets = offsets.to(torch.int32)
    block_group, block_row = block_map(offsets, blocks.block_m, max_blocks(num_rows, num_groups, blocks.block_m))
    hidden = torch.empty(num_rows, w_down.shape[2], dtype=torch.bfloat16, device=x.device)  # [N, I]
    _launch(x, w_gate_up, hidden, None, offsets, block_group, block_row, True, blocks)
    rw = None if row_weight is None else row_weight.to(torch.float32).contiguous()
    _launch(hidden, w_down, out, rw, offsets, block_group, block_row, False, blocks)
    return out


def _check_inputs(x, w_gate_up: QuantWeight, w_down: QuantWeight, offsets, row_weight) -> None:
    groups, two_inter, hidden = w_gate_up.shape
    if groups == 0:
        raise ValueError("w_gate_up has no expert copies (G = 0); expected [G >= 1, 2I, H]")
    expected_down = (groups, hidden, two_inter // 2)
    if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[1] != hidden or x.stride(1) != 1:
        raise ValueError(f"x must be contiguous bf16 [N, {hidden}], got {x.dtype} {tuple(x.shape)}")
    if two_inter % 2 or tuple(w_down.shape) != expected_down:
        raise ValueError(f"w_down shape {tuple(w_down.shape)} does not match w_gate_up {w_gate_up.shape}: expected {expected_down}")
    if offsets.shape != (groups + 1,) or offsets.device != x.device:
        raise ValueError(f"offsets must be [G+1] = [{groups + 1}] on {x.device}, got {tuple(offsets.shape)} on {offsets.device}")
    if row_weight is not None and row_weight.shape != (x.shape[0],):
        raise ValueError(f"row_weight must be [N] = [{x.shape[0]}], got {tuple(row_weight.shape)}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.fmt not in _FMT_CODE or w.data.device != x.device or not w.data.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {sorted(_FMT_CODE)} weight on {x.device}, got {w.fmt} on {w.data.device}")
