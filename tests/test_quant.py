"""Quantization math: layout, byte counts, round trips and error bounds."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep import memory
from rnq_ep.quant import INT4_GROUP, dequantize, error_table, nbytes, quantize


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_int4_group_matches_memory_model():
    assert INT4_GROUP == memory.INT4_GROUP


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@given(n=st.integers(1, 40), k=st.integers(1, 300))
@settings(max_examples=25, deadline=None)
def test_nbytes_equals_memory_projection_bytes(fmt, n, k):
    assert nbytes(quantize(_weight(3, n, k), fmt)) == 3 * memory.projection_bytes(n, k, fmt)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_layout_dtypes_and_shapes(fmt):
    q = quantize(_weight(2, 6, 257), fmt)
    expected = {
        "bf16": (torch.bfloat16, (2, 6, 257), None),
        "int8": (torch.int8, (2, 6, 257), (torch.float32, (2, 6))),
        "int4": (torch.uint8, (2, 6, 129), (torch.float16, (2, 6, math.ceil(257 / INT4_GROUP)))),
    }[fmt]
    assert (q.data.dtype, tuple(q.data.shape)) == expected[:2]
    assert (q.scale is None) == (expected[2] is None)
    if q.scale is not None:
        assert (q.scale.dtype, tuple(q.scale.shape)) == expected[2]
    assert q.shape == (2, 6, 257)


def test_int4_packs_even_k_in_low_nibble():
    w = torch.tensor([[7.0, -7.0, 1.0]])  # scale 1: q = w, stored q + 8
    q = quantize(w, "int4")
    assert q.data.tolist() == [[15 | (1 << 4), 9 | (8 << 4)]]


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_dequantize_returns_fp32_of_logical_shape(fmt):
    w = _weight(3, 5, 131)
    assert dequantize(quantize(w, fmt)).dtype == torch.float32
    assert dequantize(quantize(w, fmt)).shape == w.shape


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_representable_weights_round_trip_exactly(fmt):
    levels = 127 if fmt == "int8" else 7
    q = torch.randint(-levels, levels + 1, (4, 256), generator=torch.Generator().manual_seed(1)).float()
    q[:, 0], q[:, 128] = levels, -levels  # pin every row's (and group's) max to a level
    w = q * 0.5  # power-of-two scale: exact in fp16 and fp32
    assert torch.equal(dequantize(quantize(w, fmt)), w)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_is_idempotent(fmt):
    once = dequantize(quantize(_weight(8, 300), fmt))
    assert torch.allclose(dequantize(quantize(once, fmt)), once, rtol=1e-3, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_zero_and_tiny_rows_stay_finite(fmt):
    w = torch.zeros(3, 200)
    w[1] = 1e-30
    w[2, 5] = 1e-9
    out = dequantize(quantize(w, fmt))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(200))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_error_per_element_within_half_a_step(fmt):
    w = _weight(16, 256)
    q = quantize(w, fmt)
    step = q.scale[:, None] if fmt == "int8" else q.scale.float().repeat_interleave(INT4_GROUP, dim=-1)
    assert ((dequantize(q) - w).abs() <= step / 2 + 1e-6).all()


def test_relative_errors_on_normal_and_heavy_tailed_weights_are_sane():
    errors = error_table(rows=256, cols=512)
    assert errors[("normal", "int8")] < 0.01
    assert errors[("normal", "int4")] < 0.13
    assert errors[("student-t3", "int8")] < 0.05
    assert errors[("student-t3", "int4")] < 0.30
    assert errors[("normal", "int8")] < errors[("normal", "int4")]


def test_unknown_format_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="'fp8'"):
        quantize(_weight(2, 2), "fp8")
