"""`rnq-ep demo`: plain EP vs R&Q on a local Ray cluster of 4 CPU workers, on real OLMoE expert loads.

No GPU, no download. The `demo-olmoe` model has OLMoE-1B-7B's routing shape with small experts
(configs/models/demo-olmoe.toml). Both plans are made for the `cpu4` cluster at plain-EP memory
from the shipped arXiv load file and run in one Ray job, interleaved step by step in the same
workers: the driver feeds each step one batch, routed from the GitHub load file (another text
domain, so the plans are tested on loads they were not made from), and both plans run it, taking
turns at going first. Outputs are checked against the unsharded model computed on the driver.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from rnq_ep.balance import SlotTable
from rnq_ep.metrics import load_imbalance_score
from rnq_ep.planner import plan_plain_ep, plan_rnq
from rnq_ep.report import console
from rnq_ep.runtime.ray_cli import run_live
from rnq_ep.runtime.ray_cluster import ClusterError, connect
from rnq_ep.runtime.ray_driver import WorkerFailed, make_job
from rnq_ep.runtime.inputs import layer_counts, make_batch, random_layer_weights
from rnq_ep.runtime.worker import StepStats, seeded_shared_experts
from rnq_ep.specs import CONFIG_DIR, LoadStats, ModelSpec, Plan, PlanOptions, encode_json, load_cluster, load_model, load_stats, write_atomic

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
    step_seconds: float  # median wall time of a timed step (rank 0, barrier to barrier)
    critical_cpu_seconds: float  # median over timed steps of the sum over layers of the busiest worker's expert CPU time
    max_output_diff: float  # max |output - unsharded output| over every rank and step


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rnq-ep demo`."""
    parser.add_argument("--out", type=Path, default=Path("rnq-ep-demo"), metavar="DIR",
                        help="folder for the plans and the PNG (created)")
    parser.add_argument("--tokens", type=int, default=512, metavar="N", help="tokens per worker per step")
    parser.add_argument("--steps", type=int, default=8, metavar="S", help="steps, each run by both plans")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="seed of weights and batches")
    parser.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S", help="bound on each phase of a run")


def demo_main(args: argparse.Namespace) -> int:
    """Plan, run plain EP and R&Q on local Ray, print the comparison and save the PNG; 0 ok, 1 failed."""
    out = console()
    model, cluster = load_model(MODEL), load_cluster(CLUSTER)
    plan_loads, run_loads = load_stats(PLAN_LOADS, model), load_stats(RUN_LOADS, model)
    out.print(f"[bold]1/4 planning[/] {MODEL} on {CLUSTER} ({cluster.num_gpus} CPU workers) at plain-EP memory, "
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
    reference = unsharded_outputs(plans["plain EP"], model, run_loads, cluster.num_gpus, args.tokens, args.steps, args.seed)
    runs = [summarize(name, plans[name], [[s for s in rank_stats if s.plan == index] for rank_stats in result.stats], reference)
            for index, name in enumerate(plans)]
    out.print(comparison_table(runs))
    png = args.out / "tokens_per_worker.png"
    plot_tokens(runs, png)
    out.print(f"plans: {paths['plain EP']}, {paths['R&Q']}; tokens per worker plot: [bold]{png}[/]")
    return 0


def unsharded_outputs(plan: Plan, model: ModelSpec, loads: LoadStats | None, world: int, tokens: int, steps: int, seed: int) -> list[list[torch.Tensor]]:
    """The batches run_worker draws, through the dense model in fp32 (shared experts included): [rank][step] -> [T, H]."""
    counts = layer_counts(plan, loads)
    weights = [(*random_layer_weights(model, index, seed), seeded_shared_experts(model, index, seed))
               for index in range(len(plan.layers))]
    outputs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: extra threads only spin, and the Ray workers share the cores
    try:
        for rank in range(world):
            outputs.append([_dense_step(model, counts, weights, seed, rank, step, tokens) for step in range(steps)])
    finally:
        torch.set_num_threads(threads)
    return outputs


def _dense_step(model: ModelSpec, counts: list[np.ndarray], weights: list, seed: int, rank: int, step: int, tokens: int) -> torch.Tensor:
    """One rank's step through the dense model: run_worker's batch (make_batch) through every layer."""
    hidden, routing = make_batch(model, counts, tokens, seed, rank, step)  # [T, H], per layer (ids, weights) [T, k]
    for (w_gate_up, w_down, _, shared), (ids, gate) in zip(weights, routing):
        out = dense_moe(hidden, ids, gate, w_gate_up, w_down)
        hidden = hidden + (out if shared is None else out + shared(hidden))
    return hidden


def dense_moe(x: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Every expert on all of its tokens, fp32: x [T, H], ids/gate [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [T, H]."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    inter = w_down.shape[-1]
    for expert in ids.unique().tolist():
        token, k = torch.nonzero(ids == expert, as_tuple=True)
        gate_up = x[token].float() @ w_gate_up[expert].float().T  # [n, 2I]
        y = (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w_down[expert].float().T  # [n, H]
        out.index_add_(0, token, y * gate[token, k, None].float())
    return out


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
        step_seconds=float(np.median([steps[i].seconds for i in timed])),
        critical_cpu_seconds=float(np.median(critical)),
        max_output_diff=max(diffs),
    )


def _global_copy_rows(table: SlotTable, rank_layers: list) -> np.ndarray:
    """Rows per copy of the whole layer [S] from each rank's LayerStats.tokens_per_copy [C_r]."""
    rows = np.zeros(table.num_slots, dtype=np.int64)
    for rank, layer in enumerate(rank_layers):
        rows[np.flatnonzero(table.gpu == rank)] = layer.tokens_per_copy
    return rows


def comparison_table(runs: list[PolicyRun]) -> Table:
    """Metrics side by side, with the ratio of the first run (the baseline) to each other."""
    base = runs[0]
    table = Table(title="plain EP vs R&Q on 4 CPU workers (same batches, same memory)", title_justify="left",
                  caption="ratios are baseline / R&Q (> 1: R&Q faster); times are medians over steps 1.. (step 0 warms up), "
                  "both plans run every step in the same workers, taking turns at going first; "
                  "critical path = sum over layers of the busiest worker's expert CPU time, what one worker per core "
                  "would wait for; steadier than wall time on a shared or oversubscribed CPU",
                  caption_justify="left")
    table.add_column("metric")
    for run in runs:
        table.add_column(run.name, justify="right")
    rows = [
        (f"tokens per worker, layer {layer}", lambda r, j=j: " ".join(f"{t:.0f}" for t in r.tokens_per_worker[j]))
        for j, layer in enumerate(base.layers)
    ] + [
        ("balancedness (max/mean)", lambda r: f"{r.balancedness:.3f}"),
        ("LIS", lambda r: f"{r.lis:.2f}"),
        ("quantized-token fraction", lambda r: f"{r.quantized_fraction:.3f}"),
        ("step time, median s", lambda r: f"{r.step_seconds:.3f}"),
        ("step time ratio", lambda r: f"{base.step_seconds / r.step_seconds:.2f}x"),
        ("critical path: busiest expert CPU s", lambda r: f"{r.critical_cpu_seconds:.3f}"),
        ("critical path ratio", lambda r: f"{base.critical_cpu_seconds / r.critical_cpu_seconds:.2f}x"),
        ("max |output - unsharded|", lambda r: f"{r.max_output_diff:.2e}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(run) for run in runs))
    return table


def plot_tokens(runs: list[PolicyRun], path: Path) -> None:
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
    fig.suptitle(f"{MODEL} on {CLUSTER}: tokens per worker, plain EP vs R&Q")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    plt.close(fig)
