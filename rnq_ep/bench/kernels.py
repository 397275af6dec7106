"""Kernel benchmark: Triton grouped SwiGLU (bf16/int8/int4) against torch baselines and the card's roofline.

`rnq-ep bench kernels` or `python -m rnq_ep.bench.kernels`; needs a CUDA GPU, torch and triton
only. The roofline is measured in the same run: a device-to-device copy gives the bandwidth
roof and a bf16 8192^3 matmul the FLOP roof. Baselines, also in the same run: the fp32
reference loop, torch._grouped_mm on bf16 weights, and dequantise-then-grouped_mm for int8/int4.
The Triton kernel and the grouped_mm baselines are timed as CUDA-graph replays (GPU time without
Python launch overhead); the reference loop syncs with the host, so it is timed eagerly. L2 is
flushed before every timed run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rnq_ep.quant import FORMATS, QuantWeight, dequantize, nbytes, quantize

SHAPES = {"deepseek-v3": (7168, 2048), "qwen3-30b-a3b": (2048, 768), "mixtral-8x7b": (4096, 14336)}  # (H, I)
ROWS_PER_EXPERT = (1, 8, 64, 512, 4096)
NUM_COPIES = 8
_COPY_BYTES = 1 << 30
_MATMUL_SIZE = 8192
_L2_FLUSH_BYTES = 256 << 20
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Roof:
    """Measured ceilings of the card: copy bandwidth and bf16 matmul throughput."""

    bytes_per_s: float
    flop_per_s: float


@dataclass(frozen=True)
class Result:
    """One (shape, rows per expert, format) measurement; speedups are baseline time / kernel time."""

    shape: str
    rows_per_expert: int
    fmt: str
    seconds: float
    moved_bytes: int
    flops: int
    vs_reference: float | None
    vs_grouped_mm_bf16: float | None
    vs_dequant_grouped_mm: float | None
    rel_error: float


def swiglu_flops(num_rows: int, hidden: int, inter: int) -> int:
    """FLOPs of a SwiGLU expert over num_rows rows: gate_up 2*N*H*2I + down 2*N*I*H."""
    return 6 * num_rows * hidden * inter


def moved_bytes(weight_bytes: int, num_rows: int, hidden: int, inter: int) -> int:
    """HBM traffic: weights once + bf16 x read, [N, I] intermediate written and read, out written."""
    return weight_bytes + 2 * num_rows * (2 * hidden + 2 * inter)


def roofline_fraction(seconds: float, num_bytes: int, flops: int, roof: Roof) -> float:
    """Fraction of the roofline reached: max(bytes / bandwidth, flops / peak) / measured time."""
    return max(num_bytes / roof.bytes_per_s, flops / roof.flop_per_s) / seconds


def markdown_table(results: list[Result], roof: Roof) -> str:
    """Markdown table of results, with achieved throughput as % of the measured roofs."""

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    lines = [
        "| model | rows/expert | fmt | time (us) | GB/s | % HBM | TFLOP/s | % peak | % roofline"
        " | vs reference | vs grouped_mm bf16 | vs dequant+grouped_mm | rel err |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        bandwidth, flop_rate = r.moved_bytes / r.seconds, r.flops / r.seconds
        lines.append(
            f"| {r.shape} | {r.rows_per_expert} | {r.fmt} | {r.seconds * 1e6:.1f} | {bandwidth / 1e9:.0f}"
            f" | {100 * bandwidth / roof.bytes_per_s:.0f} | {flop_rate / 1e12:.1f} | {100 * flop_rate / roof.flop_per_s:.0f}"
            f" | {100 * roofline_fraction(r.seconds, r.moved_bytes, r.flops, roof):.0f}"
            f" | {ratio(r.vs_reference)} | {ratio(r.vs_grouped_mm_bf16)} | {ratio(r.vs_dequant_grouped_mm)} | {r.rel_error:.1e} |"
        )
    return "\n".join(lines)


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int, flush: torch.Tensor) -> float:
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured into a CUDA graph (replay); fn itself if it cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        _log.warning("CUDA graph capture failed (%s); timing eagerly", err)
        return fn
    return graph.replay


def measure_roof(flush: torch.Tensor, repeats: int) -> Roof:
    """Copy bandwidth (1 GiB, read + write) and bf16 8192^3 matmul FLOP/s on the current GPU."""
    src = torch.empty(_COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), repeats, 3, flush)
    a = torch.randn(_MATMUL_SIZE, _MATMUL_SIZE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    matmul_s = _median_seconds(lambda: a @ b, repeats, 3, flush)
    return Roof(bytes_per_s=2 * _COPY_BYTES / copy_s, flop_per_s=2 * _MATMUL_SIZE**3 / matmul_s)


def _grouped_mm_swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    inter = w_down.shape[-1]
    gate_up = torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=ends)  # [N, 2I]
    hidden = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [N, I]
    return torch._grouped_mm(hidden, w_down.transpose(1, 2), offs=ends)  # [N, H]


def _dequant_grouped_mm(x: torch.Tensor, w_gate_up: QuantWeight, w_down: QuantWeight, ends: torch.Tensor) -> torch.Tensor:
    gate_up, down = dequantize(w_gate_up).to(torch.bfloat16), dequantize(w_down).to(torch.bfloat16)
    return _grouped_mm_swiglu(x, gate_up, down, ends)


def _time_optional(fn: Callable[[], object], args: argparse.Namespace, flush: torch.Tensor) -> float | None:
    """Graphed median time of a torch baseline, or None where this torch/GPU lacks it."""
    try:
        return _median_seconds(_graphed(fn), args.repeats, args.warmup, flush)
    except (RuntimeError, NotImplementedError) as err:
        _log.warning("baseline unavailable: %s", err)
        return None


def bench_shape(name: str, formats: list[str], args: argparse.Namespace, flush: torch.Tensor) -> list[Result]:
    """Results of every (rows per expert, format) on one model shape, on flush.device, baselines timed alongside."""
    from rnq_ep.kernels import grouped_swiglu, grouped_swiglu_reference

    hidden, inter = SHAPES[name]
    device = flush.device
    gen = torch.Generator(device=device).manual_seed(0)
    gate_up = torch.randn(NUM_COPIES, 2 * inter, hidden, device=device, dtype=torch.bfloat16, generator=gen) * hidden**-0.5
    down = torch.randn(NUM_COPIES, hidden, inter, device=device, dtype=torch.bfloat16, generator=gen) * inter**-0.5
    weights = {fmt: (quantize(gate_up, fmt), quantize(down, fmt)) for fmt in formats}
    results = []
    for rows in args.rows:
        _log.info("%s: %d rows per expert", name, rows)
        x = torch.randn(NUM_COPIES * rows, hidden, device=device, dtype=torch.bfloat16, generator=gen)
        offsets = torch.arange(NUM_COPIES + 1, device=device, dtype=torch.int32) * rows
        ends = offsets[1:]
        ref_s = None
        if not args.skip_reference:
            ref_s = _median_seconds(lambda: grouped_swiglu_reference(x, gate_up, down, offsets), args.repeats, args.warmup, flush)
        gmm_s = _time_optional(lambda: _grouped_mm_swiglu(x, gate_up, down, ends), args, flush)
        for fmt, (q_gate_up, q_down) in weights.items():
            kernel_s = _median_seconds(_graphed(lambda: grouped_swiglu(x, q_gate_up, q_down, offsets)), args.repeats, args.warmup, flush)
            deq_s = None if fmt == "bf16" else _time_optional(lambda: _dequant_grouped_mm(x, q_gate_up, q_down, ends), args, flush)
            expected = grouped_swiglu_reference(x, dequantize(q_gate_up), dequantize(q_down), offsets)
            error = (grouped_swiglu(x, q_gate_up, q_down, offsets).float() - expected).norm() / expected.norm().clamp_min(1e-30)
            results.append(Result(
                name, rows, fmt, kernel_s, moved_bytes(nbytes(q_gate_up) + nbytes(q_down), x.shape[0], hidden, inter),
                swiglu_flops(x.shape[0], hidden, inter), None if ref_s is None else ref_s / kernel_s,
                None if gmm_s is None else gmm_s / kernel_s, None if deq_s is None else deq_s / kernel_s, float(error),
            ))
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnq-ep bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS_PER_EXPERT), help="rows per expert copy")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true", help="do not time the slow fp32 reference loop")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark and write a markdown report to stdout; 2 without a CUDA GPU."""
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        sys.stderr.write("rnq-ep bench kernels needs a CUDA GPU: torch.cuda.is_available() is False\n")
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    roof = measure_roof(flush, args.repeats)
    results = [r for name in args.shapes for r in bench_shape(name, args.formats, args, flush)]
    import triton

    report = "\n".join([
        f"## Grouped SwiGLU kernels on {torch.cuda.get_device_name()}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; {NUM_COPIES} expert copies; median of "
        f"{args.repeats} runs. Roofs measured in this run: copy {roof.bytes_per_s / 1e12:.2f} TB/s, "
        f"bf16 {_MATMUL_SIZE}^3 matmul {roof.flop_per_s / 1e12:.0f} TFLOP/s. Speedups are baseline time / kernel time.",
        "",
        markdown_table(results, roof),
        "",
    ])
    sys.stdout.write(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
