"""`rnq-ep demo`: plain EP vs R&Q on a local Ray cluster of CPU workers (one per core), on real OLMoE expert loads.

No GPU, no download. The `demo-olmoe` model has OLMoE-1B-7B's routing shape with small experts
(configs/models/demo-olmoe.toml). Both plans are made for the `cpu4` cluster's figures with one
worker per core (--workers) at plain-EP memory from the shipped arXiv load file and run in one Ray
job, interleaved step by step in the same workers: the driver feeds each step one batch, routed
from the GitHub load file (another text domain, so the plans are tested on loads they were not made
from), and both plans run it, taking turns at going first. Outputs are checked against the
unsharded model computed on the driver; R&Q's int8/int4 copies differ from it by their rounding,
which the driver bounds on the same tokens (`dense_moe`'s error, `quantization_note`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch
from rich.table import Table

from rnq_ep.balance import SlotTable
from rnq_ep.metrics import load_imbalance_score
from rnq_ep.planner import plan_plain_ep, plan_rnq
from rnq_ep.quant import dequantize, quantize
from rnq_ep.report import console
from rnq_ep.runtime.inputs import layer_counts, make_batch, random_layer_weights
from rnq_ep.runtime.worker import StepStats, seeded_shared_experts
from rnq_ep.specs import (
    CONFIG_DIR, ClusterSpec, LoadStats, ModelSpec, Plan, PlanOptions, SpecError, encode_json, load_cluster,
    load_model, load_stats, write_atomic,
)

MODEL = "demo-olmoe"
CLUSTER = "cpu4"
PLAN_LOADS = CONFIG_DIR / "loads" / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"
RUN_LOADS = CONFIG_DIR / "loads" / "olmoe-1b-7b-0924_olmoe-repo_github.json"


@dataclass(frozen=True)
class PolicyRun:
    """What one plan did on the cluster, over all steps and layers."""

    name: str
    layers: tuple[int, ...]  # decoder layer ids
    tokens_per_worker: np.ndarray  # [L, G] rows each worker computed in each layer, mean over steps
    balancedness: float  # mean over steps and layers of max/mean rows per worker
    lis: float  # mean over steps and layers of the heaviest copy's rows / (rows / experts)
    quantized_fraction: float  # rows served by int8/int4 copies / all rows
    step_seconds: np.ndarray  # [S'] wall time of each timed step (rank 0, barrier to barrier)
    critical_cpu_seconds: np.ndarray  # [S'] per timed step, the sum over layers of the busiest worker's expert CPU time
    max_output_diff: float  # max |output - unsharded output| over every rank and step


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rnq-ep demo`."""
    parser.add_argument("--out", type=Path, default=Path("rnq-ep-demo"), metavar="DIR",
                        help="folder for the plans and the PNG (created)")
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2), metavar="N",
                        help="CPU workers, one per core so that wall time can show balance (default: the cores here)")
    parser.add_argument("--tokens", type=int, default=512, metavar="N", help="tokens per worker per step")
    parser.add_argument("--steps", type=int, default=8, metavar="S", help="steps, each run by both plans")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="seed of weights and batches")
    parser.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S", help="bound on each phase of a run")


def check_demo_arguments(args: argparse.Namespace, num_experts: int) -> None:
    """Raise SpecError naming the first bad flag, before any planning or Ray start-up."""
    checks = [("--workers", args.workers, 2 <= args.workers <= num_experts, f"an integer in [2, {num_experts}]"),
              ("--tokens", args.tokens, args.tokens >= 1, "an integer >= 1"),
              ("--steps", args.steps, args.steps >= 1, "an integer >= 1"),
              ("--seed", args.seed, args.seed >= 0, "an integer >= 0"),
              ("--num-cpus", args.num_cpus, args.num_cpus is None or args.num_cpus >= 1, "an integer >= 1"),
              ("--timeout", args.timeout, math.isfinite(args.timeout) and args.timeout > 0, "seconds > 0")]
    for flag, value, ok, expected in checks:
        if not ok:
            raise SpecError(f"{flag} {value}: expected {expected}")
    if args.out.exists() and not args.out.is_dir():
        raise SpecError(f"--out {args.out}: is a file, expected a folder")


def demo_cluster(workers: int) -> ClusterSpec:
    """The cpu4 cluster's per-worker figures with `workers` workers on one host."""
    return msgspec.structs.replace(load_cluster(CLUSTER), name=f"cpu{workers}", nodes=1, gpus_per_node=workers)


def demo_main(args: argparse.Namespace) -> int:
    """Plan, run plain EP and R&Q on local Ray, print the comparison and save the PNG; 0 ok, 1 failed, 2 bad input."""
    model = load_model(MODEL)
    check_demo_arguments(args, model.num_experts)
    from rnq_ep.runtime.ray_cli import run_live  # Ray loads in seconds: only once the flags are known to be good
    from rnq_ep.runtime.ray_cluster import ClusterError, connect
    from rnq_ep.runtime.ray_driver import WorkerFailed, make_job

    out, cluster = console(), demo_cluster(args.workers)
    plan_loads, run_loads = load_stats(PLAN_LOADS, model), load_stats(RUN_LOADS, model)
    out.print(f"[bold]1/4 planning[/] {MODEL} for {cluster.num_gpus} CPU workers at plain-EP memory, "
              f"from {PLAN_LOADS.name}")
    args.out.mkdir(parents=True, exist_ok=True)
    plans = {"plain EP": plan_plain_ep(model, cluster, plan_loads), "R&Q": plan_rnq(model, cluster, plan_loads, PlanOptions())}
    paths = {}
    for name, plan in plans.items():
        paths[name] = args.out / f"plan_{'rnq' if name == 'R&Q' else 'plain_ep'}.json"
        write_atomic(paths[name], encode_json(plan))
    out.print(f"[bold]2/4 starting[/] a local Ray cluster; routing drawn from {RUN_LOADS.name}")
    try:
        connect(None, args.num_cpus)
        # one job, both plans in the same workers step by step: separate jobs ran at different speeds whatever the plan
        job = make_job(str(paths["plain EP"]), str(RUN_LOADS), interleave=[str(paths["R&Q"])], tokens=args.tokens,
                       steps=args.steps, seed=args.seed, backend="torch", keep_outputs=True, timeout_s=args.timeout)
        out.print(f"[bold]3/4 running[/] plain EP and R&Q in the same workers: {args.steps} steps of {args.tokens} "
                  "tokens per worker, each step's batch through both plans")
        result = run_live(job, 0, None, out, label="plain EP + R&Q")
    except (ClusterError, WorkerFailed) as err:
        sys.stderr.write(f"rnq-ep demo: error: {err}\n")
        return 1
    out.print("[bold]4/4 checking[/] outputs against the unsharded model on the driver")
    reference, bound = unsharded_run(plans["plain EP"], model, run_loads, cluster.num_gpus, args.tokens, args.steps,
                                         args.seed, quantized_plan=plans["R&Q"])
    runs = [summarize(name, plans[name], [[s for s in rank_stats if s.plan == index] for rank_stats in result.stats], reference)
            for index, name in enumerate(plans)]
    out.print(comparison_table(runs, cluster.num_gpus))
    out.print(f"[bold]{headline(runs[0], runs[1])}[/]", highlight=False)
    out.print(quantization_note(runs[1].max_output_diff, bound), markup=False, highlight=False)
    png = args.out / "tokens_per_worker.png"
    plot_tokens(runs, png, cluster.name)
    out.print(f"plans: {paths['plain EP']}, {paths['R&Q']}; tokens per worker plot: [bold]{png}[/]")
    return 0


def unsharded_outputs(
    plan: Plan, model: ModelSpec, loads: LoadStats | None, world: int, tokens: int, steps: int, seed: int,
) -> list[list[torch.Tensor]]:
    """The batches run_worker draws, through the dense model in fp32 (shared experts included): [rank][step] -> [T, H]."""
    return unsharded_run(plan, model, loads, world, tokens, steps, seed)[0]


def unsharded_run(
    plan: Plan, model: ModelSpec, loads: LoadStats | None, world: int, tokens: int, steps: int, seed: int,
    quantized_plan: Plan | None = None,
) -> tuple[list[list[torch.Tensor]], float]:
    """(unsharded_outputs, the largest per-token quantization bound of `quantized_plan`'s copies on those tokens
    (dense_moe's error); 0.0 without one)."""
    counts = layer_counts(plan, loads)
    weights = [(*random_layer_weights(model, index, seed), seeded_shared_experts(model, index, seed))
               for index in range(len(plan.layers))]
    quantized = [{} for _ in plan.layers] if quantized_plan is None else quantized_experts(quantized_plan, weights)
    outputs, bound = [], 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: extra threads only spin, and the Ray workers share the cores
    try:
        for rank in range(world):
            steps_out = [_dense_step(model, counts, weights, quantized, seed, rank, step, tokens) for step in range(steps)]
            outputs.append([hidden for hidden, _ in steps_out])
            bound = max([bound, *(step_bound for _, step_bound in steps_out)])
    finally:
        torch.set_num_threads(threads)
    return outputs, bound


def quantized_experts(plan: Plan, weights: list) -> list[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Per plan layer, expert -> its int8/int4 copies' dequantised (gate_up [2I, H], down [H, I]), one per format."""
    out = []
    for layer, (w_gate_up, w_down, *_) in zip(plan.layers, weights):
        formats = sorted({(s.expert, s.fmt) for s in layer.slots if s.fmt != "bf16"})
        by_expert: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for expert, fmt in formats:
            copy = dequantize(quantize(w_gate_up[expert], fmt)), dequantize(quantize(w_down[expert], fmt))
            by_expert.setdefault(expert, []).append(copy)
        out.append(by_expert)
    return out


def _dense_step(model: ModelSpec, counts: list[np.ndarray], weights: list, quantized: list, seed: int, rank: int,
                step: int, tokens: int) -> tuple[torch.Tensor, float]:
    """One rank's step through the dense model (run_worker's batch, make_batch): (output [T, H], its quantization bound)."""
    hidden, routing = make_batch(model, counts, tokens, seed, rank, step)  # [T, H], per layer (ids, weights) [T, k]
    bound = torch.zeros(tokens)  # [T]
    for (w_gate_up, w_down, _, shared), (ids, gate), copies in zip(weights, routing, quantized):
        out, error = dense_moe(hidden, ids, gate, w_gate_up, w_down, copies)
        bound += error
        hidden = hidden + (out if shared is None else out + shared(hidden))
    return hidden, float(bound.max())


def dense_moe(
    x: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
    quantized: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert on all of its tokens, fp32: x [T, H], ids/gate [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] ->
    (out [T, H], error [T]): per token, the sum over its k experts of gate x the largest |f_q(x) - f(x)| over the
    expert's `quantized` copies (dequantised weights), what any choice of copies can add to that token's output."""
    out, error = torch.zeros(x.shape, dtype=torch.float32), torch.zeros(x.shape[0])
    for expert in ids.unique().tolist():
        token, k = torch.nonzero(ids == expert, as_tuple=True)
        rows = x[token].float()  # [n, H]
        y = _swiglu(rows, w_gate_up[expert].float(), w_down[expert].float())  # [n, H]
        weight = gate[token, k].float()  # [n]
        out.index_add_(0, token, y * weight[:, None])
        copies = (quantized or {}).get(expert, [])
        if copies:
            worst = torch.stack([(_swiglu(rows, gate_up, down) - y).abs().amax(dim=1) for gate_up, down in copies])  # [F, n]
            error.index_add_(0, token, worst.amax(dim=0) * weight)
    return out, error


def _swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """x [n, H] through one expert: silu(gate) * up then down -> [n, H] (w_gate_up [2I, H], w_down [H, I])."""
    inter = w_down.shape[-1]
    gate_up = x @ w_gate_up.T  # [n, 2I]
    return (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w_down.T


def summarize(name: str, plan: Plan, stats: list[list[StepStats]], reference: list[list[torch.Tensor]]) -> PolicyRun:
    """PolicyRun of one plan's stats [rank][step]: rank 0's global counters, every rank's outputs and expert CPU time."""
    tables = [SlotTable.from_layer(layer, plan.cluster.num_gpus, plan.model.num_experts) for layer in plan.layers]
    steps = stats[0]
    per_copy = [  # (table, rows per copy [S]) of every step and layer, from every rank's local copies
        (table, _global_copy_rows(table, [rank_stats[i].layers[j] for rank_stats in stats]))
        for i in range(len(steps)) for j, table in enumerate(tables)
    ]
    rows = sum(float(copy_rows.sum()) for _, copy_rows in per_copy)
    quantized = sum(float(copy_rows[table.fmt != 0].sum()) for table, copy_rows in per_copy)
    diffs = [(s.output - ref).abs().max().item() for rank, ref_steps in enumerate(reference)
             for s, ref in zip(stats[rank], ref_steps)]
    timed = range(1 if len(steps) > 1 else 0, len(steps))  # step 0 warms up allocators and caches
    # every layer waits for its busiest worker (one all-to-all each way), so the critical path sums per-layer maxima
    critical = [sum(max(rank_stats[i].layers[j].expert_cpu_seconds for rank_stats in stats) for j in range(len(tables)))
                for i in timed]
    return PolicyRun(
        name=name,
        layers=tuple(layer.layer for layer in plan.layers),
        tokens_per_worker=np.mean([[layer.tokens_per_gpu for layer in s.layers] for s in steps], axis=0),
        balancedness=float(np.mean([s.balancedness for s in steps])),
        lis=float(np.mean([load_imbalance_score(copy_rows, plan.model.num_experts) for _, copy_rows in per_copy])),
        quantized_fraction=quantized / rows if rows else 0.0,
        step_seconds=np.array([steps[i].seconds for i in timed]),
        critical_cpu_seconds=np.array(critical),
        max_output_diff=max(diffs),
    )


def _global_copy_rows(table: SlotTable, rank_layers: list) -> np.ndarray:
    """Rows per copy of the whole layer [S] from each rank's LayerStats.tokens_per_copy [C_r]."""
    rows = np.zeros(table.num_slots, dtype=np.int64)
    for rank, layer in enumerate(rank_layers):
        rows[np.flatnonzero(table.gpu == rank)] = layer.tokens_per_copy
    return rows


def comparison_table(runs: list[PolicyRun], workers: int) -> Table:
    """Metrics side by side, with the ratio of the first run (the baseline) to each other."""
    base = runs[0]
    table = Table(title=f"plain EP vs R&Q on {workers} CPU workers (same batches, same memory)", title_justify="left",
                  caption="times: median (min-max) over steps 1.. (step 0 warms up); ratios: baseline / R&Q, the median "
                  "of the per-step ratios (> 1: R&Q faster); both plans run every step in the same workers, taking "
                  "turns at going first. Critical path = sum over layers of the busiest worker's expert CPU time. "
                  "LIS = rows of the busiest expert copy / mean rows per expert (R&Q's load imbalance score; 1 = "
                  "no copy above the mean expert)", caption_justify="left")
    table.add_column("metric")
    for run in runs:
        table.add_column(run.name, justify="right")
    rows = [
        (f"tokens per worker, layer {layer}", lambda r, j=j: " ".join(f"{t:.0f}" for t in r.tokens_per_worker[j]))
        for j, layer in enumerate(base.layers)
    ] + [
        ("balancedness (max/mean)", lambda r: f"{r.balancedness:.3f}"),
        ("LIS (busiest copy / mean expert)", lambda r: f"{r.lis:.2f}"),
        ("quantized-token fraction", lambda r: f"{r.quantized_fraction:.3f}"),
        ("step time, s", lambda r: _spread(r.step_seconds, "{:.3f}")),
        ("step time ratio", lambda r: "1.00x" if r is base else _spread(base.step_seconds / r.step_seconds, "{:.2f}x")),
        ("critical path, s", lambda r: _spread(r.critical_cpu_seconds, "{:.3f}")),
        ("critical path ratio",
         lambda r: "1.00x" if r is base else _spread(base.critical_cpu_seconds / r.critical_cpu_seconds, "{:.2f}x")),
        ("max |output - unsharded|", lambda r: f"{r.max_output_diff:.2e}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(run) for run in runs))
    return table


def _spread(values: np.ndarray, fmt: str) -> str:
    """'median (min-max)' of values [S], each formatted with `fmt`."""
    return f"{fmt.format(np.median(values))} ({fmt.format(values.min())}-{fmt.format(values.max())})"


def headline(base: PolicyRun, rnq: PolicyRun) -> str:
    """One line: R&Q's wall-clock speedup over the baseline (median and range of per-step ratios), critical path beside."""
    wall, critical = base.step_seconds / rnq.step_seconds, base.critical_cpu_seconds / rnq.critical_cpu_seconds
    return (f"R&Q vs {base.name}: {np.median(wall):.2f}x by wall clock (per-step ratios over {wall.size} steps, "
            f"{wall.min():.2f}x-{wall.max():.2f}x); critical path {np.median(critical):.2f}x "
            f"({critical.min():.2f}x-{critical.max():.2f}x)")


def within_bound(diff: float, bound: float) -> bool:
    """Whether R&Q's largest output difference from the unsharded model is within its quantization bound."""
    return diff <= bound * (1 + 1e-4) + 1e-5  # fp32 rounding of the sums on either side


def quantization_note(diff: float, bound: float) -> str:
    """Why R&Q's output differs from the unsharded model, and the bound it must meet."""
    verdict = "within" if within_bound(diff, bound) else "OVER"
    return (f"R&Q's outputs differ from the unsharded model by up to {diff:.2e}, {verdict} its quantization bound "
            f"{bound:.2e}; plain EP's differ by fp32 rounding only. R&Q's int8/int4 copies round each weight to within half "
            "a step (int8: max|row|/254, int4: max|group of 128|/14). The bound adds, per token and layer, gate x the "
            "largest |f_quantized(x) - f(x)| over each chosen expert's quantized copies, on the same tokens: exact for "
            "one layer; over several it leaves out how one layer's rounding moves the next layer's input")


def plot_tokens(runs: list[PolicyRun], path: Path, cluster: str) -> None:
    """Bar charts of tokens per worker, one panel per layer, one bar per run and worker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = runs[0].layers
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.4), sharey=True, squeeze=False)
    workers = np.arange(runs[0].tokens_per_worker.shape[1])
    width = 0.8 / len(runs)
    for j, (ax, layer) in enumerate(zip(axes[0], layers)):
        for i, run in enumerate(runs):
            loads = run.tokens_per_worker[j]
            ax.bar(workers + i * width, loads, width, label=f"{run.name} (max/mean {loads.max() / loads.mean():.2f})")
        ax.axhline(float(np.mean(runs[0].tokens_per_worker[j])), color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(workers + width * (len(runs) - 1) / 2, [f"w{w}" for w in workers])
        ax.set_title(f"layer {layer}")
        ax.legend(loc="lower right", fontsize=7)
    axes[0][0].set_ylabel("expert rows per step (dashed: even split)")
    fig.suptitle(f"{MODEL} on {cluster}: tokens per worker, plain EP vs R&Q")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    plt.close(fig)
