"""`python -m rnq_ep.bench.cpu_weight_only`: torch's CPU weight-only int8/int4 matmuls against fp32 and bf16 ones.

The question behind the torch expert backend's choice (docs/kernels.md): can int8/int4 copies be
kept packed on CPU and computed from their bytes (`torch._weight_int8pack_mm`, per-channel scales;
`torch._weight_int4pack_mm_for_cpu`, group-128 scales and zeros) without losing to the fp32 matmul
on dequantised weights the backend uses? Our int4 layout maps onto the int4pack one exactly:
nibble = q + 8 and the kernel computes (nibble - 8) * scale + zero, so zero = 0 and the fp16 scale
converted to the activation dtype (exact for fp32). Per (projection, rows): error against fp64 on
the same dequantised weights, and speedups over `x @ W^T` in fp32, one thread, CPU time, median.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console

from rnq_ep.quant import INT4_GROUP, QuantWeight, dequantize, quantize

SHAPES = ((2048, 512), (512, 1024))  # (N, K): gate_up and down of `bench layer`'s H 512, I 1024 experts


def int4pack(q: QuantWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 weight [N, K] as int4pack's (packed weight, scales and zeros [K / 128, N, 2] in dtype)."""
    nibbles = torch.stack((q.data & 0xF, q.data >> 4), dim=-1).flatten(-2)[:, : q.shape[-1]].to(torch.int32)
    scale = q.scale.to(dtype).T  # [K / 128, N]
    return torch._convert_weight_to_int4pack_for_cpu(nibbles, 1), torch.stack((scale, torch.zeros_like(scale)), -1)


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median over 5 rounds of fn's thread CPU time per call, after one warm-up call."""
    fn()
    rounds = []
    for _ in range(5):
        start = time.thread_time()
        for _ in range(repeats):
            fn()
        rounds.append((time.thread_time() - start) / repeats)
    return float(np.median(rounds))


def measure(n: int, k: int, rows: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, float]:
    """Relative errors and speedups over fp32 of the bf16 matmul and both packed kernels with `dtype` activations."""
    w = torch.randn(n, k, generator=gen) / k**0.5
    q8, q4 = quantize(w, "int8"), quantize(w, "int4")
    w32, w_bf16 = dequantize(q8), w.to(torch.bfloat16)
    packed, scale_zeros = int4pack(q4, dtype)
    x = torch.randn(rows, k, generator=gen)
    xd = x.to(dtype)
    int8_mm = lambda: torch._weight_int8pack_mm(xd, q8.data, q8.scale.to(dtype))  # noqa: E731
    int4_mm = lambda: torch._weight_int4pack_mm_for_cpu(xd, packed, INT4_GROUP, scale_zeros)  # noqa: E731

    def error(out: torch.Tensor, weight: torch.Tensor) -> float:
        ref = xd.double() @ weight.double().T
        return float((out.double() - ref).norm() / ref.norm())

    repeats = max(3, int(1e8 / (2 * rows * n * k)))
    fp32 = cpu_seconds(lambda: x @ w32.T, repeats)
    return {
        "int8 error": error(int8_mm(), w32), "int4 error": error(int4_mm(), dequantize(q4)),
        "bf16 matmul": fp32 / cpu_seconds(lambda: xd.to(torch.bfloat16) @ w_bf16.T, repeats),
        "int8pack": fp32 / cpu_seconds(int8_mm, repeats), "int4pack": fp32 / cpu_seconds(int4_mm, repeats),
        "fp32 us": fp32 * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    """Print one markdown row per (activation dtype, shape, rows); 0 on success."""
    p = argparse.ArgumentParser(prog="python -m rnq_ep.bench.cpu_weight_only", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,32,128,512", help="comma list of rows per call")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print_rows([int(r) for r in args.rows.split(",")])
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the tests) keeps its own setting
    return 0


def print_rows(row_counts: list[int]) -> None:
    """Measure and print the markdown table: per activation dtype, shape and rows per call."""
    gen = torch.Generator().manual_seed(0)
    console = Console(highlight=False, markup=False, width=200)
    console.print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread\n")
    console.print("| activations | N x K | rows | fp32 x @ W^T (us) | bf16 matmul | int8pack | int4pack | int8pack rel. error | int4pack rel. error |")
    console.print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in SHAPES:
            for rows in row_counts:
                m = measure(n, k, rows, dtype, gen)
                console.print(f"| {str(dtype)[6:]} | {n} x {k} | {rows} | {m['fp32 us']:.0f} | {m['bf16 matmul']:.2f}x | "
                      f"{m['int8pack']:.2f}x | {m['int4pack']:.2f}x | {m['int8 error']:.1e} | {m['int4 error']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
