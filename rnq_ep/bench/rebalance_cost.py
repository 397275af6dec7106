"""`rnq-ep bench rebalance`, cost-model part: DeepSeek-V3 on 64-1024 H200s, staged vs stop-the-world.

Per GPU count: an R&Q plan on one Zipf window, then the online re-plan (`replan`: fresh plan, kept in
place, each layer moved only if it pays for itself over `horizon` steps) on the next window, whose
hot set has drifted. Only the layers the rebalancer would move are priced, with its own move cost
(peer link time plus checkpoint reloads at the inter-node link). The step is the cost model's time
of the plan that serves after the switch (the faster one: the conservative denominator).
"""

from __future__ import annotations

import msgspec
import numpy as np

from rnq_ep.bench.planner import BenchTable
from rnq_ep.costmodel import predict_plan
from rnq_ep.memory import expert_bytes
from rnq_ep.planner import plan_rnq
from rnq_ep.rebalance.replan import replan
from rnq_ep.specs import FORMATS, Fmt, Plan, PlanOptions, load_cluster, load_model
from rnq_ep.synthetic import ZipfLoads, window_stats, zipf_windows

HORIZON_STEPS = 1000  # steps a re-plan is expected to serve: its moves must pay for themselves over these
LOADS = ZipfLoads(1.0, drift=0.5)


def layer_bytes(plan: Plan) -> np.ndarray:
    """Bytes of every layer's copies [L] (what a full reload of the layer moves)."""
    size = {fmt: expert_bytes(plan.model, fmt) for fmt in FORMATS}
    return np.array([sum(size[s.fmt] for s in layer.slots) for layer in plan.layers], dtype=np.float64)


def cost_model_row(
    num_gpus: int, layers: int, tokens_per_gpu: int, seed: int, formats: tuple[Fmt, ...], horizon: int
) -> tuple[str, ...]:
    """One table row for `num_gpus` GPUs (see `cost_model_table` for the columns)."""
    model, base = load_model("deepseek-v3"), load_cluster("h200x64")
    cluster = msgspec.structs.replace(base, name=f"h200x{num_gpus}", nodes=num_gpus // base.gpus_per_node)
    windows = zipf_windows(LOADS, layers, model.num_experts, model.top_k, 2, tokens_per_gpu * num_gpus, seed)
    old = plan_rnq(model, cluster, window_stats(windows[0], model.top_k, model.name), PlanOptions(formats=formats))
    result = replan(old, windows[1], horizon, tokens_per_gpu)
    after = window_stats(windows[1], model.top_k, model.name)
    stale_s = predict_plan(old, after, tokens_per_gpu)  # [layers] seconds
    served_s = predict_plan(result.plan, after, tokens_per_gpu)
    moving = [d for d in result.decisions if d.move]
    scale = model.num_layers / layers  # the sampled layers stand for all of the model's layers
    step_s = float(served_s.sum()) * scale
    staged_s = max((d.cost_s for d in moving), default=0.0)
    world_s = sum(d.cost_s for d in moving) * scale
    held = layer_bytes(result.plan)
    moved = [(d.bytes_moved, d.bytes_if_bf16, held[i]) for i, d in enumerate(result.decisions) if d.move]
    gb = [f"{np.mean([m[k] for m in moved]) / 1e9:.2f}" if moved else "-" for k in range(3)]
    return (
        str(num_gpus),
        f"{len(moving)} of {layers}",
        f"{gb[0]} ({gb[1]}) of {gb[2]}",
        f"{float(stale_s.sum()) * scale * 1e3:.1f} -> {step_s * 1e3:.1f}",
        f"{staged_s * 1e3:.2f}",
        f"{(step_s + staged_s) / step_s:.2f}",
        f"{world_s * 1e3:.1f}",
        f"{(step_s + world_s) / step_s:.2f}",
    )


def cost_model_table(
    gpu_counts: list[int],
    layers: int,
    tokens_per_gpu: int,
    seed: int,
    formats: tuple[Fmt, ...] = FORMATS,
    horizon: int = HORIZON_STEPS,
) -> BenchTable:
    """DeepSeek-V3 on H200 nodes: the stall of staging one layer's moves per step vs all layers' at once."""
    model = load_model("deepseek-v3")
    rows = [cost_model_row(g, layers, tokens_per_gpu, seed, formats, horizon) for g in gpu_counts]
    title = (f"Cost model: {model.name} ({model.num_layers} MoE layers) on H200 nodes, plain-EP memory budget, "
             f"formats {'+'.join(formats)}, {tokens_per_gpu} tokens per GPU per step, {LOADS.label}: the hot set "
             f"drifts by half between two windows; {layers} layers re-planned (horizon {horizon} steps), scaled to all")
    note = ("Only layers whose move pays for itself are moved (the rebalancer's own decision and move cost: peer link "
            "time plus checkpoint reloads at the inter-node link). GB moved: mean over moved layers, in the copies' "
            "formats (in bf16), of the bytes the layer's new copies hold. Step: cost-model time of the stale plan -> "
            "the plan after the switch (the ratios use the latter). Staged: one layer's moves per step, not overlapped "
            "with the step (upper bound; on a side stream it overlaps); stop-the-world: every moving layer's moves "
            "between two steps (sum of per-layer link times: an upper bound).")
    header = ("GPUs", "layers moved", "GB moved / moved layer (if bf16) of its GB", "step ms (stale -> after)",
              "staged: worst extra (ms)", "staged vs step", "stop-the-world pause (ms)", "stop-the-world vs step")
    return BenchTable(title, header, rows, note)
