"""Kernel benchmark program: roofline arithmetic, report table and the no-GPU exit (no GPU needed)."""

import pytest
import torch

from rnq_ep.bench import kernels as bench
from rnq_ep.quant import nbytes, quantize

ROOF = bench.Roof(bytes_per_s=3.0e12, flop_per_s=800e12)


def test_shape_table_has_the_three_model_shapes():
    assert bench.SHAPES == {"deepseek-v3": (7168, 2048), "qwen3-30b-a3b": (2048, 768), "mixtral-8x7b": (4096, 14336)}
    assert bench.ROWS_PER_EXPERT == (1, 8, 64, 512, 4096)


def test_swiglu_flops_count_three_gemms():
    assert bench.swiglu_flops(num_rows=3, hidden=5, inter=7) == 2 * 3 * 5 * 14 + 2 * 3 * 7 * 5


def test_moved_bytes_add_bf16_activations_to_weights():
    weights = nbytes(quantize(torch.zeros(2, 8, 4), "int4")) + nbytes(quantize(torch.zeros(2, 4, 4), "int4"))
    # x [N, H] read, hidden [N, I] written and read, out [N, H] written, 2 bytes each
    assert bench.moved_bytes(weights, num_rows=3, hidden=4, inter=4) == weights + 2 * (3 * 4 + 2 * 3 * 4 + 3 * 4)


def test_deepseek_decode_bf16_is_bandwidth_bound_at_the_design_estimate():
    hidden, inter = bench.SHAPES["deepseek-v3"]
    weights = 8 * 3 * hidden * inter * 2  # 704 MB of bf16 weights, ~235 us at 3 TB/s
    seconds = 470e-6
    fraction = bench.roofline_fraction(seconds, bench.moved_bytes(weights, 8, hidden, inter), bench.swiglu_flops(8, hidden, inter), ROOF)
    assert fraction == pytest.approx(0.5, rel=1e-3)


def test_large_prefill_is_compute_bound():
    hidden, inter = bench.SHAPES["mixtral-8x7b"]
    rows = 8 * 4096
    flops = bench.swiglu_flops(rows, hidden, inter)
    fraction = bench.roofline_fraction(flops / ROOF.flop_per_s, bench.moved_bytes(0, rows, hidden, inter), flops, ROOF)
    assert fraction == pytest.approx(1.0)


def test_markdown_table_has_one_row_per_result_and_na_for_missing_baselines():
    result = bench.Result("qwen3-30b-a3b", 8, "int4", 1e-5, 30_000_000, 10**9, 50.0, None, 3.0, 2e-3)
    table = bench.markdown_table([result, result], ROOF).splitlines()
    assert len(table) == 4
    assert "| qwen3-30b-a3b | 8 | int4 | 10.0 | 3000 | 100 |" in table[2]
    assert "| 50.00x | n/a | 3.00x |" in table[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without a GPU")
def test_main_without_cuda_exits_2_with_a_message(capsys):
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_grouped_mm_baselines_compute_the_reference_swiglu(fmt):
    from rnq_ep.kernels.reference import grouped_swiglu_reference
    from rnq_ep.quant import dequantize

    gen = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    x = torch.randn(7, 32, generator=gen).to(torch.bfloat16)
    gate_up, down = quantize(torch.randn(3, 48, 32, generator=gen) / 6, fmt), quantize(torch.randn(3, 32, 24, generator=gen) / 5, fmt)
    expected = grouped_swiglu_reference(x, dequantize(gate_up), dequantize(down), offsets)
    got = bench._dequant_grouped_mm(x, gate_up, down, offsets[1:])
    torch.testing.assert_close(got.float(), expected, atol=3e-2 * expected.abs().max().item(), rtol=3e-2)


class _FakeEvent:
    """Stands in for torch.cuda.Event on CPU: every timed run takes 1 ms."""

    def __init__(self, enable_timing: bool = False):
        self.enable_timing = enable_timing

    def record(self) -> None:
        pass

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return 1.0


@pytest.mark.slow
def test_bench_shape_runs_end_to_end_on_cpu_with_fake_timers(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", (64, 32))
    monkeypatch.setattr(bench, "NUM_COPIES", 2)
    monkeypatch.setattr(bench, "_graphed", lambda fn: fn)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    args = bench._parser().parse_args(["--rows", "1", "3", "--repeats", "2", "--warmup", "1"])
    results = bench.bench_shape("tiny", ["bf16", "int4"], args, flush=torch.empty(16, dtype=torch.uint8))
    assert [(r.rows_per_expert, r.fmt) for r in results] == [(1, "bf16"), (1, "int4"), (3, "bf16"), (3, "int4")]
    assert all(r.seconds == 1e-3 and r.vs_reference == 1.0 and r.rel_error < 2e-2 for r in results)
    assert [r.vs_dequant_grouped_mm for r in results] == [None, 1.0, None, 1.0]
