"""`rnq-ep bench layer`: the EP layer on CPU gloo ranks with real skew: plain EP, EPLB-equivalent, R&Q.

Every configuration plans the same model for the same workers from the same load file. One set of
spawned gloo ranks builds all configurations from the same seeded weights and runs them on the
same batches (routing drawn from the file's per-layer counts), interleaved step by step, so that
load from other processes on the host falls on all of them alike. Ratios are against plain EP.

Two step times are reported. `wall` is barrier to barrier; on a host with fewer cores than ranks
it understates imbalance, because ranks that finish early hand their core to the slow one.
`critical` is the expert compute of a step when every rank has a core (or GPU) of its own: each
step is rerun with the ranks computing their local experts one at a time (`bench/turns.py`), and
per step the slowest rank's expert CPU time is summed over layers; the median over steps counts.

No placement can make a step faster than plain EP's max/mean tokens per rank (the "ceiling"): a
perfectly balanced layer. Averaged over a file's layers that is ~1.2x at 4 ranks, so `--most-skewed`
runs the one layer where the gap is largest instead: over every real load file whose model has a
config (configs/loads and ../shared/data/expert-loads), the (file, layer) with the largest plain-EP
max/mean at --ranks ranks, by that rule alone. `--repeats` reruns the whole interleaved run and
reports the median of each figure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console

from rnq_ep.bench.planner import EPLB_EXTRA, PLAIN, SHARED_LOADS, SHIPPED_LOADS, BenchTable, publish, with_budget
from rnq_ep.bench.skew import single_layer, skewed_layers
from rnq_ep.bench.turns import expert_seconds_alone
from rnq_ep.layer import EPMoE
from rnq_ep.memory import plain_ep_budget
from rnq_ep.metrics import gpu_bytes, layer_tables
from rnq_ep.planner import plan_eplb, plan_plain_ep, plan_rnq
from rnq_ep.runtime.inputs import layer_counts, make_batch, random_layer_weights
from rnq_ep.runtime.worker import StepStats, free_port, leave_group, run_step
from rnq_ep.specs import LoadStats, ModelSpec, Plan, PlanOptions, load_cluster, load_model, load_stats

DEFAULT_LOADS = SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"  # shipped OLMoE file with the largest median plain-EP max/mean at 4 ranks
DEFAULT_MODEL = "olmoe-1b-7b"
RNQ_LEAST_LOADED, RNQ_HASH = "R&Q, least-loaded routing", "R&Q, hash routing"
RNQ_INT4, RNQ_INT4_HASH = "R&Q bf16+int8+int4, least-loaded routing", "R&Q bf16+int8+int4, hash routing"
RANK_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class Config:
    """One row of the bench: a plan and the routing policy it runs with."""

    name: str
    plan: Plan
    policy: str


@dataclass(frozen=True)
class Measured:
    """One configuration over the timed steps."""

    wall_s: float  # median step time, barrier to barrier
    critical_s: float  # median step's sum over layers of the slowest rank's expert CPU time (see summarise)
    balancedness: float  # mean over layers of max/mean tokens per rank
    mb_sent: float  # all ranks, with dedupe
    mb_sent_no_dedupe: float


def configs(model: ModelSpec, cluster_name: str, num_ranks: int, loads: LoadStats) -> list[Config]:
    """Plain EP, EPLB-equivalent with +12.5 % memory (even split over replicas), R&Q (bf16+int8) and R&Q with int4
    too, each with least-loaded and hash routing: the planner's default options but for the formats."""
    cluster = msgspec.structs.replace(load_cluster(cluster_name), nodes=1, gpus_per_node=num_ranks)
    cluster = with_budget(cluster, model, PlanOptions())
    rnq = plan_rnq(model, cluster, loads, PlanOptions())
    rnq_int4 = plan_rnq(model, cluster, loads, PlanOptions(formats=("bf16", "int8", "int4")))
    return [
        Config(PLAIN, plan_plain_ep(model, cluster, loads), "least-loaded"),
        Config(EPLB_EXTRA, plan_eplb(model, cluster, loads, extra_memory=0.125), "static"),
        Config(RNQ_LEAST_LOADED, rnq, "least-loaded"),
        Config(RNQ_HASH, rnq, "hash"),
        Config(RNQ_INT4, rnq_int4, "least-loaded"),
        Config(RNQ_INT4_HASH, rnq_int4, "hash"),
    ]


def summarise(per_rank: list[list[StepStats]], alone: np.ndarray | None = None) -> Measured:
    """Figures over the steps after the first (which warms allocators and caches): stats [rank][step].

    alone [rank, step, layer]: expert seconds with the ranks taking turns (expert_seconds_alone); the
    critical step is then the median over steps of sum over layers of the slowest rank. Without it,
    per layer the slowest rank's fastest step of the concurrent run (ranks' fastest steps may differ).
    """
    steps = range(1, len(per_rank[0]))
    num_layers = len(per_rank[0][0].layers)

    def median(values) -> float:
        return float(np.median(list(values)))

    def fastest(rank: list[StepStats], layer: int) -> float:  # other processes' load only ever adds time
        return min(rank[s].layers[layer].expert_cpu_seconds for s in steps)

    if alone is None:
        critical = sum(max(fastest(rank, layer) for rank in per_rank) for layer in range(num_layers))
    else:
        critical = median(alone[:, 1:].max(axis=0).sum(axis=1))  # [R, S, L] -> [S-1, L] -> [S-1]
    return Measured(
        wall_s=median(per_rank[0][s].seconds for s in steps),
        critical_s=critical,
        balancedness=median(per_rank[0][s].balancedness for s in steps),
        mb_sent=median(sum(rank[s].bytes_sent for rank in per_rank) for s in steps) / 1e6,
        mb_sent_no_dedupe=median(sum(rank[s].bytes_sent_no_dedupe for rank in per_rank) for s in steps) / 1e6,
    )


def bench_rank(rank: int, num_ranks: int, plans: list[Plan], policies: list[str], counts: list[np.ndarray],
               tokens: int, steps: int, seed: int) -> tuple[list[list[StepStats]], np.ndarray]:
    """One rank: every plan's layers from the same weights, run on the same batches, each step run again with
    the ranks' experts in turns: (stats [config][step], expert seconds alone [config, step, layer])."""
    dist.init_process_group("gloo", rank=rank, world_size=num_ranks)
    try:
        model = plans[0].model
        layers: list[list[EPMoE]] = [[] for _ in plans]
        for index in range(len(plans[0].layers)):
            weights = random_layer_weights(model, index, seed)
            for plan, policy, built in zip(plans, policies, layers):
                built.append(EPMoE(model, plan.layers[index], num_ranks, rank, dist.group.WORLD, *weights,
                                   policy=policy, backend="torch"))
        stats: list[list[StepStats]] = [[] for _ in plans]
        alone: list[list[list[float]]] = [[] for _ in plans]
        for step in range(steps + 1):
            hidden, routing = make_batch(model, counts, tokens, seed, rank, step)
            for built, out, seconds in zip(layers, stats, alone):
                out.append(run_step(step, built, hidden, routing, dist.group.WORLD, keep_outputs=False))
                seconds.append(expert_seconds_alone(built, hidden, routing, rank, num_ranks, dist.group.WORLD))
        return stats, np.array(alone)
    finally:
        leave_group(created=True)


def spawn_ranks(num_ranks: int, kwargs: dict) -> list:
    """bench_rank on `num_ranks` local processes (gloo over loopback, one thread each): results by rank."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [ctx.Process(target=_rank_main, args=(rank, num_ranks, env, kwargs, results)) for rank in range(num_ranks)]
    for proc in procs:
        proc.start()
    try:
        out = {}
        while len(out) < num_ranks:
            try:
                rank, ok, value = results.get(timeout=RANK_TIMEOUT_S)
            except queue.Empty:
                raise TimeoutError(f"bench ranks did not finish within {RANK_TIMEOUT_S:.0f} s") from None
            if not ok:
                raise RuntimeError(f"bench rank {rank} failed:\n{value}")
            out[rank] = value
        return [out[rank] for rank in range(num_ranks)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


def _rank_main(rank: int, num_ranks: int, env: dict, kwargs: dict, results) -> None:
    """Child: rendezvous env, one compute thread, bench_rank, report (rank, ok, result or traceback)."""
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        results.put((rank, True, bench_rank(rank, num_ranks, **kwargs)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def bench_table(rows: list[tuple[Config, list[Measured]]], model: ModelSpec, num_ranks: int, args: argparse.Namespace,
                source: str) -> BenchTable:
    """Markdown-ready table of median figures over repeats [config][repeat]; speedups are plain EP's time over the
    row's, taken within each repeat."""
    base = rows[0][1]
    budget = plain_ep_budget(model, num_ranks)
    header = ("configuration", "memory / plain EP", "wall step (s)", "wall speedup", "critical step (s)",
              "critical speedup", "max/mean tokens per rank", "ceiling (time ∝ max tokens)", "MB sent (dedupe / none)")

    def median(values) -> float:
        return float(np.median(list(values)))

    def speedup(runs: list[Measured], key: str) -> str:
        ratios = [getattr(b, key) / getattr(m, key) for b, m in zip(base, runs)]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        return f"{median(ratios):.2f}x{spread}"

    plain_balancedness = median(m.balancedness for m in base)
    table_rows = []
    for config, runs in rows:
        memory = max(int(gpu_bytes(model, table).max()) for table in layer_tables(config.plan)) / budget
        balancedness = median(m.balancedness for m in runs)
        table_rows.append((
            config.name, f"{memory:.3f}", f"{median(m.wall_s for m in runs):.3f}", speedup(runs, "wall_s"),
            f"{median(m.critical_s for m in runs):.3f}", speedup(runs, "critical_s"), f"{balancedness:.2f}",
            f"{plain_balancedness / balancedness:.2f}x", f"{median(m.mb_sent for m in runs):.1f} / "
            f"{median(m.mb_sent_no_dedupe for m in runs):.1f}",
        ))
    title = (f"EP layer, {num_ranks} CPU gloo ranks, {model.name} ({model.num_experts} experts, top-{model.top_k}, "
             f"H {model.hidden_size}, I {model.moe_intermediate_size}), {args.tokens} tokens per rank, "
             f"{len(rows[0][0].plan.layers)} layers, routing drawn from {source}")
    repeats = f"median of {args.repeats} runs (range in brackets), " if args.repeats > 1 else ""
    note = (f"{repeats}configurations interleaved step by step in each run. wall: barrier to barrier, {num_ranks} "
            f"ranks sharing {os.cpu_count()} cores (and the host's other load), so it hides imbalance; critical: per "
            "step rerun with the ranks computing their experts one at a time (each the fastest of 3 tries), the slowest "
            "rank per layer summed, median over steps: the step with one core per rank. "
            "ceiling: the critical speedup if expert time were proportional to a rank's tokens, plain EP's max/mean "
            f"over the row's; no placement can beat plain EP's max/mean ({plain_balancedness:.2f}x in this run). A "
            "copy also costs a pass over its weights whatever its rows, which the ceiling ignores: extra copies pay it. "
            "Quantized copies compute from fp32 dequantised weights on CPU (docs/kernels.md, torch backend), so they "
            "run as fast as bf16 ones and memory is the plan's bytes, as on a GPU at large batch.")
    return BenchTable(title, header, table_rows, note)


def build_parser() -> argparse.ArgumentParser:
    """Options of `rnq-ep bench layer`."""
    p = argparse.ArgumentParser(prog="rnq-ep bench layer", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--loads", type=Path, help=f"real load file (plans and routing) [{DEFAULT_LOADS.name}]")
    p.add_argument("--model", help=f"model whose experts/top-k match the load file [{DEFAULT_MODEL}]")
    p.add_argument("--most-skewed", action="store_true",
                   help="run the one layer of all real load files with the largest plain-EP max/mean at --ranks "
                        "(chooses --loads and --model)")
    p.add_argument("--hidden", type=int, default=512, help="expert hidden size (scaled down for CPU)")
    p.add_argument("--inter", type=int, default=1024, help="expert intermediate size (scaled down for CPU)")
    p.add_argument("--ranks", type=int, default=4, help="gloo worker processes")
    p.add_argument("--cluster", default="cpu4", help="cluster whose links the plans assume; resized to --ranks")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration (plus one warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="whole interleaved runs; the table shows medians")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path, help="also write the table as a markdown fragment")
    return p


def workload(args: argparse.Namespace) -> tuple[str, LoadStats, str]:
    """(model name, load stats, where the routing comes from) that the options ask for."""
    if not args.most_skewed:
        loads = args.loads or DEFAULT_LOADS
        return args.model or DEFAULT_MODEL, load_stats(loads), loads.name
    if args.loads or args.model:
        raise SystemExit("rnq-ep bench layer: --most-skewed chooses the load file and model; drop --loads/--model")
    candidates = skewed_layers(args.ranks)
    if not candidates:
        raise SystemExit(f"rnq-ep bench layer: no real load file in {SHIPPED_LOADS} or {SHARED_LOADS}")
    top = candidates[0]
    source = (f"{top.path.name}, decoder layer {top.layer_id}: the largest plain-EP max/mean at {args.ranks} ranks "
              f"({top.plain_ep_balancedness:.2f} on the file's counts) of {len(candidates)} layers in "
              f"{len({c.path.name for c in candidates})} real load files (rule: --most-skewed)")
    return top.model, single_layer(load_stats(top.path), top.position), source


def main(argv: list[str] | None = None) -> int:
    """Plan every configuration, run each on spawned gloo ranks, print a markdown table; 0 on success."""
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        raise SystemExit(f"rnq-ep bench layer: --repeats and --steps must be >= 1, got {args.repeats}, {args.steps}")
    model_name, loads, source = workload(args)
    base = load_model(model_name)
    model = msgspec.structs.replace(base, name=f"{base.name}@{args.hidden}x{args.inter}",
                                    hidden_size=args.hidden, moe_intermediate_size=args.inter)
    console = Console(highlight=False)
    runs = configs(model, args.cluster, args.ranks, loads)
    kwargs = dict(plans=[c.plan for c in runs], policies=[c.policy for c in runs],
                  counts=layer_counts(runs[0].plan, loads), tokens=args.tokens, steps=args.steps, seed=args.seed)
    measured: list[list[Measured]] = [[] for _ in runs]  # [config][repeat]
    for repeat in range(args.repeats):
        with console.status(f"run {repeat + 1}/{args.repeats}: {len(runs)} configurations interleaved on "
                            f"{args.ranks} gloo ranks"):
            per_rank = spawn_ranks(args.ranks, kwargs)  # [rank] (stats [config][step], alone [config, step, layer])
        for c, out in enumerate(measured):
            alone = np.stack([seconds[c] for _, seconds in per_rank])  # [R, S, L]
            out.append(summarise([stats[c] for stats, _ in per_rank], alone))
    command = "rnq-ep bench layer " + " ".join(argv if argv is not None else sys.argv[1:])
    table = bench_table(list(zip(runs, measured)), model, args.ranks, args, source)
    publish([table], command, console, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
