"""`rnq-ep plan` (capacity-planning dry run) and `rnq-ep bench planner`: argument parsing and output."""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import msgspec
import numpy as np

from rnq_ep.bench.planner import (
    RNQ,
    SHARED_LOADS,
    PolicyResult,
    balance_table,
    compare_policies,
    plan_summary,
    policy_table,
    real_pairs,
    to_markdown,
)
from rnq_ep.bench.planner_pairs import all_pairs_table
from rnq_ep.bench.planner_speed import speed_table
from rnq_ep.costmodel import DEFAULT_TOKENS_PER_GPU
from rnq_ep.memory import expert_bytes, gpu_budget, plain_ep_budget
from rnq_ep.planner import EXPORTS, export_losses, export_sglang, export_vllm
from rnq_ep.report import HELP, check_folder, console, machine_line, print_table
from rnq_ep.specs import (
    FORMATS,
    ClusterSpec,
    ModelSpec,
    PlanOptions,
    SpecError,
    check_plan,
    check_routed,
    encode_json,
    load_cluster,
    load_model,
    load_stats,
    write_atomic,
)

Subparsers = argparse._SubParsersAction  # what add_parser is called on
MAX_TOKENS_PER_GPU = 2**24  # a step's tokens per GPU; real steps hold at most ~64k (prefill)


def parse_formats(text: str) -> tuple[str, ...]:
    """'bf16,int8' -> ('bf16', 'int8'), each checked against FORMATS."""
    formats = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SpecError(f"--formats: unknown format(s) {unknown}, expected a comma list of {list(FORMATS)}")
    return formats


def parse_budget(text: str | None, model: ModelSpec, cluster: ClusterSpec) -> int | None:
    """--memory-budget: bytes (e.g. 1.5e9) or 'plain-ep'; None keeps the cluster's budget."""
    if text is None:
        return None
    if text == "plain-ep":
        return plain_ep_budget(model, cluster.num_gpus)
    try:
        value = float(text)
    except ValueError:
        raise SpecError(f"--memory-budget: expected bytes (e.g. 1.5e9) or 'plain-ep', got {text!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise SpecError(f"--memory-budget: must be a positive number of bytes, got {text!r}")
    return int(value)


def check_budget(budget: int, model: ModelSpec, source: str) -> None:
    """Raise SpecError if `budget` (bytes per GPU) exceeds every expert in bf16: no plan could use it, and the
    planner's work grows with the copies a GPU could hold."""
    every_expert = model.num_experts * expert_bytes(model, "bf16")
    if budget > every_expert:
        raise SpecError(f"{source}: {budget} bytes per GPU is more than every expert of {model.name!r} in bf16 "
                        f"({every_expert} bytes); expected at most that")


def check_tokens_per_gpu(tokens_per_gpu: int) -> None:
    """Raise SpecError unless 1 <= --tokens-per-gpu <= MAX_TOKENS_PER_GPU."""
    if not 1 <= tokens_per_gpu <= MAX_TOKENS_PER_GPU:
        raise SpecError(f"--tokens-per-gpu {tokens_per_gpu}: expected an integer in [1, 2**24]")


def parse_export(text: str | None) -> tuple[str, Path | None]:
    """--export sglang:PATH | vllm:PATH -> (system, PATH); ("", None) without the flag."""
    if text is None:
        return "", None
    kind, _, path = text.partition(":")
    if kind not in EXPORTS or not path:
        raise SpecError(f"--export: expected sglang:PATH or vllm:PATH, got {text!r}")
    return kind, Path(path)


PLAN_HELP = "plan R&Q placement for a model, cluster and load file (dry run)"


def add_plan(p: argparse.ArgumentParser) -> None:
    """Flags of `rnq-ep plan`."""
    p.description = (
        "Plan Replicate-and-Quantize expert placement and compare it with plain EP and "
        "EPLB-equivalent baselines (same memory and +12.5 % memory). No GPU or weights needed."
    )
    p.add_argument("--model", required=True, metavar="NAME|PATH", help="model name in configs/models or a TOML/JSON path")
    p.add_argument("--cluster", required=True, metavar="NAME|PATH", help="cluster name in configs/clusters or a TOML/JSON path")
    p.add_argument("--loads", required=True, type=Path, metavar="FILE", help="expert-load JSON (counts[layer][expert]) to plan on")
    p.add_argument("--out", required=True, type=Path, metavar="PLAN.json", help="where to write the R&Q plan JSON")
    p.add_argument("--eval-loads", type=Path, metavar="FILE", help="score every plan on this load file instead (the honest test)")
    p.add_argument("--formats", default="bf16,int8", metavar="F,F", help="allowed weight formats, comma separated (bf16,int8,int4)")
    p.add_argument("--quality-budget", type=float, metavar="F", default=PlanOptions().quality_budget,
                   help="largest fraction of routed tokens that quantized copies may serve")
    p.add_argument("--memory-budget", metavar="BYTES|plain-ep", help="expert bytes per GPU per layer, or plain-ep (default: the cluster's)")
    p.add_argument("--max-copies", type=int, default=0, metavar="N", help="most copies of one expert (0: up to the GPU count)")
    p.add_argument("--refine", action="store_true", help="exact HiGHS refine of each layer's placement")
    p.add_argument("--refine-time-limit", type=float, metavar="S", default=PlanOptions().refine_time_limit,
                   help="seconds per layer for --refine")
    p.add_argument("--hedge", action=argparse.BooleanOptionalAction, default=PlanOptions().hedge,
                   help="spend the quality budget the balance left unused on spare copies (int8, else int4) of single-copy "
                        "quantized experts (no planned tokens), after evening out the single-copy experts per GPU: "
                        "steadier balance when served loads differ from --loads; --no-hedge plans fewer quantized copies "
                        "and fewer tokens on them when the served loads are the planning loads. No effect with --max-copies "
                        "1; with --formats bf16 or --quality-budget 0 only the evening of single-copy experts (where "
                        "replicas fit) is left; see docs/planner.md")
    p.add_argument("--tokens-per-gpu", type=int, metavar="N", default=DEFAULT_TOKENS_PER_GPU,
                   help="tokens per GPU in one step for the predicted time (loads are rescaled to it)")
    p.add_argument("--export", metavar="SYSTEM:PATH", help="also write the placement for a serving system: sglang:PATH "
                   "(--init-expert-location JSON) or vllm:PATH (EPLB state arrays); quantized copies become plain replicas, "
                   "a warning says what is lost (docs/planner.md)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="PNG of tokens per GPU per policy for the most imbalanced layer")
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    """`rnq-ep plan`: compare policies, print the table, write the plan (+ export, plot)."""
    check_tokens_per_gpu(args.tokens_per_gpu)
    model, cluster = load_model(args.model), load_cluster(args.cluster)
    loads = load_stats(args.loads, model)
    eval_loads = load_stats(args.eval_loads, model) if args.eval_loads else None
    for path, stats in ((args.loads, loads), (args.eval_loads, eval_loads)):
        if stats is not None:
            check_routed(stats, str(path))
    if eval_loads is not None and len(eval_loads.counts) != len(loads.counts):
        raise SpecError(
            f"{args.eval_loads}: has {len(eval_loads.counts)} layers but {args.loads} has {len(loads.counts)}; "
            "layers are matched by position"
        )
    options = PlanOptions(
        formats=parse_formats(args.formats),
        quality_budget=args.quality_budget,
        max_copies=args.max_copies,
        memory_budget=parse_budget(args.memory_budget, model, cluster),
        refine=args.refine,
        refine_time_limit=args.refine_time_limit,
        hedge=args.hedge,
    )
    export_system, export_path = parse_export(args.export)
    for path, flag in ((args.out, "--out"), (export_path, "--export"), (args.plot, "--plot")):
        check_folder(path, flag)
    budget = gpu_budget(model, cluster, options)
    check_budget(budget, model, "--memory-budget" if args.memory_budget else f"{args.cluster}: expert_memory_budget")
    results = compare_policies(model, cluster, loads, options, eval_loads, args.tokens_per_gpu)
    rnq = next(r for r in results if r.name == RNQ)
    scored_on = f"scored on OTHER loads {args.eval_loads.name}" if eval_loads else "scored on the same loads"
    title = (f"rnq-ep plan: {model.name} on {cluster.name} ({cluster.num_gpus} GPUs), planned on "
             f"{args.loads.name}, {scored_on}")
    note = (f"balancedness = max/mean GPU load (1.00 = perfect), min/median/max over {len(loads.counts)} layers; "
            f"MoE time = cost-model prediction summed over those layers at {args.tokens_per_gpu} tokens/GPU/step")
    summary = {"planned_on": str(args.loads), "scored_on": str(args.eval_loads or args.loads),
               **plan_summary(results, budget, args.tokens_per_gpu)}
    plan = msgspec.structs.replace(rnq.plan, summary=summary)
    check_plan(plan, where=str(args.out))  # what `rnq-ep run` checks before any rank starts
    exported = {"sglang": export_sglang, "vllm": export_vllm}[export_system](plan) if export_path else None
    print_table(policy_table(results, budget, title, note))
    write_atomic(args.out, encode_json(plan))
    if exported is not None:
        write_atomic(export_path, encode_json(exported))
        for line in export_losses(plan, export_system):
            sys.stderr.write(f"rnq-ep plan: warning: --export {export_system}: {line}\n")
    if args.plot:
        plot_gpu_loads(results, args.plot, title=f"{model.name} on {cluster.name}: tokens per GPU")
    written = [str(p) for p in (args.out, export_path, args.plot) if p]
    console().print("wrote " + ", ".join(written), markup=False, highlight=False)
    return 0


def plot_gpu_loads(results: list[PolicyResult], path: Path, title: str) -> None:
    """Tokens per GPU (best split) per policy for the most imbalanced layer: bars, or steps past 32 GPUs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in results if r.score is not None]
    worst = int(np.argmax(scored[0].score.balancedness_best))
    num_gpus = scored[0].score.best_loads.shape[1]
    gpus = np.arange(num_gpus)
    width = 0.8 / len(scored)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.2 * num_gpus * len(scored))), 4))
    for i, r in enumerate(scored):
        loads = r.score.best_loads[worst]
        label = f"{r.name} (max/mean {loads.max() / loads.mean():.2f})"
        if num_gpus <= 32:
            ax.bar(gpus + (i - (len(scored) - 1) / 2) * width, loads, width, label=label)
        else:
            ax.step(gpus, loads, where="mid", linewidth=0.8, label=label)
    ax.axhline(scored[0].score.best_loads[worst].mean(), color="black", linewidth=0.8, linestyle="--", label="mean")
    layer_id = scored[0].score.layers[worst]
    ax.set(xlabel="GPU", ylabel="tokens (least-loaded routing)", title=f"{title}, layer {layer_id}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def add_bench_planner(benches: Subparsers) -> None:
    """Register `rnq-ep bench planner`."""
    p = benches.add_parser(
        "planner", formatter_class=HELP, help="planner speed at DeepSeek-V3 scale and balance on real loads",
        description="Times plan_rnq against the EPLB-equivalent on synthetic Zipf loads and compares balance "
        "on the shipped real load files; every ratio is against a baseline measured in the same run.",
    )
    p.add_argument("--model", default="deepseek-v3", help="model for the speed table")
    p.add_argument("--cluster", default="h100x32", help="cluster whose node size and links the speed table scales")
    p.add_argument("--gpus", default="32,256,1024", help="GPU counts for the speed table, comma separated")
    p.add_argument("--layers", type=int, default=0, help="layers for the speed table (0: the model's)")
    p.add_argument("--balance-cluster", default="h100x8", help="cluster for the real-load balance table")
    p.add_argument("--no-real", action="store_true", help="skip the real-load balance table")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic loads")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables as a markdown fragment (BENCHMARKS.md)")
    p.set_defaults(run=run_bench_planner)


def run_bench_planner(args: argparse.Namespace) -> int:
    """`rnq-ep bench planner`: print (and optionally write) the speed and balance tables."""
    check_folder(args.markdown, "--markdown")
    model = load_model(args.model)
    try:
        gpu_counts = [int(g) for g in args.gpus.split(",")]
    except ValueError:
        raise SpecError(f"--gpus: expected comma separated integers, got {args.gpus!r}") from None
    options = PlanOptions()
    tables = [speed_table(model, load_cluster(args.cluster), gpu_counts, args.layers or model.num_layers,
                          args.seed, options)]
    print_table(tables[0])
    if not args.no_real:
        tables.append(balance_table(load_cluster(args.balance_cluster), options, real_pairs()))
        print_table(tables[-1])
        pairs = all_pairs_table(load_cluster(args.balance_cluster), options, SHARED_LOADS) if SHARED_LOADS.is_dir() else None
        if pairs is not None:
            tables.append(pairs)
            print_table(pairs)
    if args.markdown:
        machine = machine_line()
        command = shlex.join(["rnq-ep", *args.argv])
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        write_atomic(args.markdown, to_markdown(tables, command, machine, date).encode())
    return 0
