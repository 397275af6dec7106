"""Triton grouped SwiGLU vs the fp32 torch reference on awkward shapes.

Without CUDA the kernels run in Triton's CPU interpreter (the rnq_ep.kernels package sets
TRITON_INTERPRET before it imports triton when no GPU is present); with CUDA the same tests run natively. One
slow test compiles every variant for Hopper in a subprocess, so the compiled path is checked
without a GPU too.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.kernels import grouped_swiglu, grouped_swiglu_reference
from rnq_ep.kernels.align import block_map, max_blocks
from rnq_ep.kernels.grouped_swiglu import DECODE_BLOCKS, PREFILL_BLOCKS
from rnq_ep.kernels.reference import block_map_reference
from rnq_ep.quant import dequantize, quantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN, INTER = 96, 80  # not multiples of 64: partial column and k tiles everywhere

# (rows per group, row_weight on): G in {1, 3, 8}; groups of 0, 1, 5 and 70 rows
CASES = {
    "one-group-70-rows": ([70], True),
    "three-groups-with-empty": ([5, 0, 1], False),
    "eight-groups-mixed": ([0, 1, 5, 70, 1, 0, 5, 2], True),
}


def _problem(rows_per_group: list[int], fmt: str, row_weight: bool, seed: int = 0, hidden: int = HIDDEN, inter: int = INTER):
    gen = torch.Generator().manual_seed(seed)
    groups, rows = len(rows_per_group), sum(rows_per_group)
    offsets = torch.tensor([0, *torch.tensor(rows_per_group).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
    w_gate_up = quantize(torch.randn(groups, 2 * inter, hidden, generator=gen) / hidden**0.5, fmt)
    w_down = quantize(torch.randn(groups, hidden, inter, generator=gen) / inter**0.5, fmt)
    weights = torch.rand(rows, generator=gen) if row_weight else None
    return x, w_gate_up, w_down, offsets, weights


def _to(q, device):
    return type(q)(q.fmt, q.data.to(device), None if q.scale is None else q.scale.to(device), q.shape)


def _assert_matches_reference(x, w_gate_up, w_down, offsets, weights, blocks=None):
    expected = grouped_swiglu_reference(x, dequantize(w_gate_up), dequantize(w_down), offsets, weights)
    got = grouped_swiglu(
        x.to(DEVICE), _to(w_gate_up, DEVICE), _to(w_down, DEVICE), offsets.to(DEVICE),
        None if weights is None else weights.to(DEVICE), blocks=blocks,
    )
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    # bf16 intermediate [N, I] and bf16 output round at ~2^-9 relative; real bugs are O(1)
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(got.float().cpu(), expected, atol=2e-2 * scale, rtol=2e-2)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("case", list(CASES))
def test_grouped_swiglu_matches_reference(case, fmt):
    rows_per_group, row_weight = CASES[case]
    _assert_matches_reference(*_problem(rows_per_group, fmt, row_weight))


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_odd_hidden_and_k_spanning_int4_groups(fmt):
    # odd K (int4 padding nibble) and two int4 scale groups along H
    _assert_matches_reference(*_problem([3, 17], fmt, row_weight=False, seed=1, hidden=131, inter=40))


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("blocks", [DECODE_BLOCKS, PREFILL_BLOCKS], ids=["decode", "prefill"])
def test_gpu_block_sizes_match_reference(blocks, fmt):
    # H spans two int4 groups and a partial k tile at block_k 128
    _assert_matches_reference(*_problem([1, 0, 70], fmt, row_weight=True, seed=3, hidden=200, inter=72), blocks=blocks)


def test_row_weight_scales_each_row():
    x, w_gate_up, w_down, offsets, _ = _problem([5, 3], "int8", row_weight=False, seed=2)
    weights = torch.linspace(0.0, 2.0, x.shape[0])
    plain = grouped_swiglu(x.to(DEVICE), _to(w_gate_up, DEVICE), _to(w_down, DEVICE), offsets.to(DEVICE))
    weighted = grouped_swiglu(x.to(DEVICE), _to(w_gate_up, DEVICE), _to(w_down, DEVICE), offsets.to(DEVICE), weights.to(DEVICE))
    expected = plain.float().cpu() * weights[:, None]
    torch.testing.assert_close(weighted.float().cpu(), expected, atol=1e-2 * expected.abs().max().item(), rtol=1e-2)


def test_no_rows_gives_empty_output():
    x, w_gate_up, w_down, offsets, _ = _problem([0, 0], "bf16", row_weight=False)
    out = grouped_swiglu(x.to(DEVICE), _to(w_gate_up, DEVICE), _to(w_down, DEVICE), offsets.to(DEVICE))
    assert out.shape == (0, HIDDEN)


def test_mismatched_down_shape_is_rejected():
    x, w_gate_up, _, offsets, _ = _problem([2], "bf16", row_weight=False)
    wrong = quantize(torch.randn(1, HIDDEN, INTER + 1), "bf16")
    with pytest.raises(ValueError, match="w_down shape"):
        grouped_swiglu(x, w_gate_up, wrong, offsets)


@given(rows_per_group=st.lists(st.integers(0, 40), min_size=1, max_size=9), block_m=st.sampled_from([1, 4, 16]))
@settings(max_examples=60, deadline=None)
def test_block_map_matches_python_loop_within_the_bound(rows_per_group, block_m):
    offsets = torch.tensor([0, *torch.tensor(rows_per_group).cumsum(0).tolist()], dtype=torch.int32)
    bound = max_blocks(int(offsets[-1]), len(rows_per_group), block_m)
    got = block_map(offsets, block_m, bound)
    expected = block_map_reference(offsets, block_m, bound)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# Compiles every variant (and the block map) for Hopper (sm_90) with Triton's own NVIDIA backend; no GPU needed.
# Real launches specialise 16-aligned pointers and strides, so the source says so too.
_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import rnq_ep.kernels  # noqa: F401
    m = sys.modules["rnq_ep.kernels.grouped_swiglu"]
    names = m._grouped_swiglu_kernel.arg_names
    for fmt in (0, 1, 2):
        for gate_up, blocks in ((True, m.DECODE_BLOCKS), (False, m.PREFILL_BLOCKS)):
            w, s = {0: ("*bf16", "*bf16"), 1: ("*i8", "*fp32"), 2: ("*u8", "*fp16")}[fmt]
            kinds = ["*bf16", w, s, "*bf16", "*fp32", "*i32", "*i32", "*i32"] + ["i32"] * 8
            consts = dict(GATE_UP=gate_up, HAS_ROW_WEIGHT=not gate_up, FMT=fmt, UPCAST=False, GROUP=128, ZERO=8,
                          BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k)
            signature = dict(zip(names, kinds + ["constexpr"] * len(consts)))
            aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(kinds)) if names[i] != "stride_sn"}
            source = ASTSource(m._grouped_swiglu_kernel, signature, consts, aligned)
            options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
            sys.stdout.write(f"fmt={fmt} gate_up={gate_up} {'pipelined' if 'cp.async' in ptx else 'unpipelined'}\\n")
    align = sys.modules["rnq_ep.kernels.align"]
    source = ASTSource(align._block_map_kernel, {"offsets_ptr": "*i32", "block_group_ptr": "*i32", "block_row_ptr": "*i32",
                       "num_groups": "i32", "num_blocks": "i32", "BLOCK_M": "constexpr", "GROUPS": "constexpr",
                       "BLOCKS": "constexpr"}, {"BLOCK_M": 16, "GROUPS": 64, "BLOCKS": 32})
    triton.compile(source, target=GPUTarget("cuda", 90, 32))
""")


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_hopper_with_pipelined_loads():
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 6 and all(line.endswith(" pipelined") for line in lines), run.stdout
