"""The prepared GPU check (one H100/H200, ~2 minutes): run it once when a device is lent, record the output.

    python scripts/gpu_check.py --out gpu_check.json          # on the GPU machine, from the repository root

1. least-loaded quotas: the Triton kernel equals balance.water_fill on 200 random tables; its time.
2. experts: Triton grouped SwiGLU (bf16, int8, int4) vs torch._grouped_mm (bf16), DeepSeek-V3 shapes,
   8 copies, 64 and 1024 tokens: time per call and max error against the torch reference.
3. the layer at world size 1 (8 DeepSeek-V3 experts, bf16+int8 copies, top-8), capacity transport:
   eager, torch.compile(fullgraph=True) and a captured CUDA graph, outputs compared, time per step
   against the experts alone on the same rows.
Needs torch, triton, numpy and msgspec (rnq_ep.specs); no ray. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


def timed(fn, repeats: int = 50) -> float:
    """Median microseconds of fn() on the current CUDA stream, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return float(np.median(times))


def check_quotas(device: torch.device) -> dict:
    """Kernel == host water_fill on random tables (up to 64 GPUs, 256 experts, 4 copies); its time at 32 GPUs."""
    from rnq_ep.balance import SlotTable, water_fill
    from rnq_ep.kernels.quotas import water_fill_quotas
    from rnq_ep.quotas import route_table

    rng = np.random.default_rng(0)
    mismatches, timing = 0, None
    for case in range(200):
        gpus, experts = int(rng.integers(1, 65)), int(rng.integers(1, 257))
        copies = rng.integers(1, 5, experts)
        gpu = np.concatenate([rng.choice(gpus, c, replace=c > gpus) for c in copies])
        expert = np.repeat(np.arange(experts), copies)
        table = SlotTable.from_arrays(gpu, expert, rng.integers(0, 3, len(gpu)), np.ones(len(gpu)) / copies[expert],
                                      gpus, experts)
        counts = rng.integers(0, 5000, experts)
        route = route_table(table, 0, "least-loaded", device)
        total = torch.from_numpy(counts).to(device)
        run = lambda: water_fill_quotas(total, route.slot_gpu, route.slot_expert, route.pour_experts,  # noqa: E731
                                        route.pour_slots, gpus)
        mismatches += not np.array_equal(run().cpu().numpy(), water_fill(table, counts))
        if case == 0 or (gpus == 32 and timing is None):
            timing = {"gpus": gpus, "experts": experts, "pours": int(route.pour_experts.numel()), "us": timed(run)}
    return {"tables": 200, "mismatches": mismatches, "timing": timing}


def check_experts(device: torch.device) -> list[dict]:
    """Triton grouped SwiGLU per format vs torch._grouped_mm, DeepSeek-V3 expert shapes, 8 copies."""
    from rnq_ep.kernels import grouped_swiglu
    from rnq_ep.kernels.reference import gated, grouped_swiglu_reference
    from rnq_ep.quant import dequantize, quantize

    hidden, inter, copies = 7168, 2048, 8
    gen = torch.Generator(device=device).manual_seed(0)
    w_gate_up = (torch.randn(copies, 2 * inter, hidden, device=device, generator=gen) * hidden**-0.5).bfloat16()
    w_down = (torch.randn(copies, hidden, inter, device=device, generator=gen) * inter**-0.5).bfloat16()
    rows = []
    for tokens in (64, 1024):
        x = torch.randn(tokens, hidden, device=device, generator=gen).bfloat16()
        offsets = torch.linspace(0, tokens, copies + 1, device=device).round().int()
        ends = offsets[1:].contiguous()
        mm = lambda: torch._grouped_mm(gated(torch._grouped_mm(x, w_gate_up.transpose(1, 2), offs=ends)),  # noqa: E731
                                       w_down.transpose(1, 2), offs=ends)
        base_us = timed(mm)
        for fmt in ("bf16", "int8", "int4"):
            gu, dn = quantize(w_gate_up, fmt), quantize(w_down, fmt)
            run = lambda: grouped_swiglu(x, gu, dn, offsets)  # noqa: E731
            ref = grouped_swiglu_reference(x, dequantize(gu), dequantize(dn), offsets)
            err = float((run().float() - ref).abs().max() / ref.abs().max())
            rows.append({"tokens": tokens, "format": fmt, "triton_us": timed(run), "grouped_mm_bf16_us": base_us,
                         "max_rel_error": err})
    return rows


def check_layer(device: torch.device) -> dict:
    """One EPMoE layer at world size 1, capacity transport: eager vs compiled vs CUDA graph, time vs experts alone."""
    import msgspec

    from rnq_ep.layer import EPMoE
    from rnq_ep.specs import LayerPlan, Slot, load_model

    model = msgspec.structs.replace(load_model("deepseek-v3"), num_experts=8, num_layers=1)
    gen = torch.Generator(device=device).manual_seed(1)
    e, h, i = model.num_experts, model.hidden_size, model.moe_intermediate_size
    w_gate_up = (torch.randn(e, 2 * i, h, device=device, generator=gen) * h**-0.5).bfloat16()
    w_down = (torch.randn(e, h, i, device=device, generator=gen) * i**-0.5).bfloat16()
    router = torch.randn(e, h, device=device, generator=gen) * h**-0.5
    plan = LayerPlan(layer=0, slots=[Slot(gpu=0, expert=x, fmt="bf16" if x < 4 else "int8", share=1.0) for x in range(e)])
    layer = EPMoE(model, plan, 1, 0, None, w_gate_up, w_down, router, transport="capacity")
    layer.redo_overflow = False
    x = torch.randn(64, h, device=device, generator=gen).bfloat16()
    eager = layer(x)
    compiled_layer = torch.compile(layer, fullgraph=True)
    compiled = compiled_layer(x)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)
    graph.replay()
    ids, weights = layer.router(x)
    order = torch.argsort(ids.reshape(-1), stable=True)
    counts = torch.bincount(ids.reshape(-1), minlength=e)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    rows_x = x.repeat_interleave(model.top_k, 0)[order].contiguous()
    experts_alone = lambda: layer.experts(rows_x, offsets, weights.reshape(-1)[order])  # noqa: E731
    return {
        "compiled_vs_eager_max_abs": float((compiled.float() - eager.float()).abs().max()),
        "graph_vs_eager_max_abs": float((static_out.float() - eager.float()).abs().max()),
        "eager_step_us": timed(lambda: layer(x)), "compiled_step_us": timed(lambda: compiled_layer(x)),
        "graph_step_us": timed(graph.replay), "experts_alone_us": timed(experts_alone),
        "overflow": bool(layer.overflow),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every check on the one GPU and print (and with --out write) the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    for name, check in (("quotas", check_quotas), ("experts", check_experts), ("layer", check_layer)):
        start = time.perf_counter()
        try:
            result[name] = check(device)
        except Exception as err:  # one failing check must not hide the others' numbers
            result[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"gpu_check: {name} done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
