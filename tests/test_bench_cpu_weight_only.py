"""`python -m rnq_ep.bench.cpu_weight_only`: our int4 layout in torch's CPU int4pack format, and one dry run."""

import torch

from rnq_ep.bench.cpu_weight_only import int4pack, main
from rnq_ep.quant import INT4_GROUP, dequantize, quantize


def test_int4pack_computes_our_dequantised_int4_weight_in_fp32():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 256, generator=gen), torch.randn(5, 256, generator=gen)
    q = quantize(w, "int4")
    packed, scale_zeros = int4pack(q, torch.float32)
    out = torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, scale_zeros)
    torch.testing.assert_close(out, x @ dequantize(q).T, rtol=1e-5, atol=1e-5)


def test_one_row_prints_a_markdown_row_per_dtype_and_shape(capsys):
    assert main(["--rows", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| float") or line.startswith("| bfloat")]
    assert len(rows) == 4
