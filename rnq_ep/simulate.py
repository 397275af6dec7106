"""`rnq-ep simulate`: the policies users compare, on the cost model, from 8 to 1024 GPUs.

For each GPU count (a cluster scaled from a config: its node size, budget as plain EP) every policy
of `rnq_ep.policies` plans on one window of loads and is scored on the next (synthetic Zipf
windows whose hot sets drift; two load files, a shift of domain; windows drawn from one load
file, stationary traffic; one file twice is labelled in-sample). With `--eval-loads FILE --windows W`
the static policies plan once and are scored on W windows drawn from FILE, beside the re-plan
policies of `rnq_ep.replan_sim` (what online rebalancing recovers after the shift). Tables give
each policy's time per layer as a ratio to plain EP and to the best other policy of the same GPU
count in the same run, the time parts, balance, quantized tokens, memory, and planner and
simulation seconds. A Zipf-exponent sweep at one GPU count shows the skew at which each policy wins.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
from pathlib import Path

from rnq_ep.bench.planner import BenchTable, scaled_cluster, to_markdown
from rnq_ep.costmodel import DEFAULT_TOKENS_PER_GPU
from rnq_ep.memory import plain_ep_budget
from rnq_ep.policies import (
    PLAIN_EP, POLICIES, PolicyRun, expert_skew, run_all, synthetic_windows,
)
from rnq_ep.replan_sim import DEFAULT_REPLAN_INTERVAL, REPLAN_POLICIES, run_replanning
from rnq_ep.load_windows import drawn_windows, real_windows, shifted_windows
from rnq_ep.plan_command import MAX_TOKENS_PER_GPU
from rnq_ep.specs import MAX_GPUS, MAX_SEED, ModelSpec, SpecError, check_routed, load_cluster, load_model, load_stats, write_atomic
from rnq_ep.synthetic import DEFAULT_DRIFT, ZipfLoads, parse_zipf

DEFAULT_GPUS = "8,32,64,256,1024"
DEFAULT_CLUSTER = "h100x32"  # node size and links that --gpus scales
DEFAULT_LOADS = "zipf:0.6"
DEFAULT_SWEEP = "0.2,0.4,0.6,0.8,1.0,1.2,1.4,1.6"
SAMPLED = "sampled"  # --eval-loads: stationary windows drawn from the --loads file
SWEEP_LAYERS = 4  # synthetic layers are drawn alike, so a few stand for all in the sweep
MAX_WINDOWS = 1000
MAX_LAYERS = 1024  # synthetic layers per window
MAX_REPLAN_INTERVAL = 10**6
SCALE_NOTE = (
    "MoE us/layer: cost model, the slowest GPU's max(FLOP, HBM) time + all-to-all, plus LLEP's weight moves (not "
    "overlapped), mean over layers and scored windows; parts are the slowest GPU's. time / best other < 1: fastest of "
    "this GPU count. Memory: largest expert bytes one GPU holds for one layer (LLEP: with spilled copies) vs plain EP. "
    "Planner s: one plan of all simulated layers; simulation s: routing + cost model of one window."
)
REPLAN_NOTE = (
    " Re-plan policies: window 1 on the plan made from the --loads file, each later window on `replan` of the plan "
    "before from the previous window's counts (kept in place, a layer moved only if its gain over the interval pays "
    "for the moves); a moved layer's link time is in 'moves', divided by the interval; planner s: the mean of the "
    "first plan and the re-plans; the last column is per re-plan, all layers, not amortised: layers moved / MB sent "
    "or reloaded / link ms, layer after layer."
)


def ratios(runs: list[PolicyRun]) -> list[tuple[float, float]]:
    """(time / plain EP, time / best other policy) per run of one GPU count; NaN where not comparable."""
    plain = next(r.layer_s for r in runs if r.policy == PLAIN_EP.name)
    out = []
    for r in runs:
        others = [o.layer_s for o in runs if o is not r and not o.error]
        out.append((r.layer_s / plain, r.layer_s / min(others) if others else float("nan")))
    return out


def scale_table(runs_by_gpus: dict[int, list[PolicyRun]], model: ModelSpec, title: str) -> BenchTable:
    """One row per (GPU count, policy): time per layer, ratios, time parts, balance, memory, planner cost."""
    header = ("GPUs", "policy", "MoE us/layer", "time / plain EP", "time / best other", "FLOP / HBM / all-to-all / moves, us",
              "balancedness (median)", "quantized tokens", "max bytes/GPU (vs plain EP)", "planner s", "simulation s")
    replanning = any(r.replans for runs in runs_by_gpus.values() for r in runs)
    header += ("re-plan moves: layers / MB / ms",) if replanning else ()
    rows = []
    for g, runs in runs_by_gpus.items():
        budget = plain_ep_budget(model, g)
        for r, (vs_plain, vs_best) in zip(runs, ratios(runs)):
            if r.error:
                rows.append((str(g), r.policy, "infeasible: " + r.error) + ("",) * (len(header) - 3))
                continue
            rows.append((
                str(g), r.policy, f"{r.layer_s * 1e6:,.0f}", f"{vs_plain:.2f}", f"{vs_best:.2f}" + (" (best)" if vs_best < 1 else ""),
                " / ".join(f"{x * 1e6:,.0f}" for x in (r.flop_s, r.hbm_s, r.comm_s, r.move_s)),
                f"{r.balancedness:.2f}", f"{100 * r.quantized_fraction:.1f} %",
                f"{r.max_bytes_per_gpu / 2**20:,.0f} MiB ({100 * r.max_bytes_per_gpu / budget:.0f} %)",
                f"{r.planner_s:.3f}", f"{r.simulation_s:.3f}",
            ) + ((replan_cell(r),) if replanning else ()))
    return BenchTable(title, header, rows, SCALE_NOTE + (REPLAN_NOTE if replanning else ""))


def replan_cell(run: PolicyRun) -> str:
    """'layers / MB / ms' moved per re-plan (unamortised), or a dash for a policy that does not re-plan."""
    if not run.replans:
        return "—"
    return f"{run.replan_layers:.1f} / {run.replan_bytes / 2**20:,.0f} / {run.replan_s * 1e3:.2f}"


def sweep_table(sweep: dict[float, tuple[float, list[PolicyRun]]], num_gpus: int, title: str) -> BenchTable:
    """Per Zipf exponent: skew, plain EP time, each policy's time / plain EP, and the winner."""
    names = [r.policy for r in next(iter(sweep.values()))[1]]
    header = ("Zipf s", "expert max/mean", "plain EP us/layer", *(f"{n}: time / plain EP" for n in names[1:]), "fastest")
    rows, wins = [], {}
    for exponent, (skew, runs) in sweep.items():
        ok = [r for r in runs if not r.error]
        fastest = min(ok, key=lambda r: r.layer_s).policy
        cells = [f"{vs_plain:.2f}" if not r.error else "infeasible" for r, (vs_plain, _) in zip(runs, ratios(runs))]
        rows.append((f"{exponent:g}", f"{skew:.1f}", f"{runs[0].layer_s * 1e6:,.0f}", *cells[1:], fastest))
        wins.setdefault(fastest, []).append(f"{exponent:g}")
    note = "; ".join(f"{name} fastest at s = {', '.join(at)}" for name, at in wins.items())
    return BenchTable(title + f", {num_gpus} GPUs", header, rows, note)


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    """Register the flags of `rnq-ep simulate` on `p` and set run=simulate_main."""
    p.add_argument("--model", default="deepseek-v3", metavar="NAME|PATH", help="model name in configs/models or a TOML/JSON path")
    p.add_argument("--cluster", metavar="NAME|PATH", help=f"cluster to simulate, or with --gpus the one whose node size and links are scaled (default: {DEFAULT_CLUSTER})")
    p.add_argument("--gpus", metavar="G,G", help=f"GPU counts, comma separated (default: {DEFAULT_GPUS}, or the --cluster's own size)")
    p.add_argument("--loads", default=DEFAULT_LOADS, metavar="FILE|zipf:S[:drift=D]",
                   help=f"load file to plan on, or seeded Zipf windows with exponent S whose hot sets drift by D (default drift {DEFAULT_DRIFT})")
    p.add_argument("--eval-loads", metavar=f"FILE|{SAMPLED}",
                   help="load file to score on (default: the --loads file, in sample); with --windows W, W windows of "
                        "GPUs x --tokens-per-gpu tokens drawn from it, beside the re-plan policies; "
                        f"{SAMPLED}: windows of GPUs x --tokens-per-gpu tokens drawn from the --loads file's per-layer "
                        "frequencies, plan on each, score on the next (stationary traffic of that domain)")
    p.add_argument("--windows", type=int, metavar="W",
                   help=f"synthetic or {SAMPLED} windows (default 2): plan on each, score on the next; with --eval-loads "
                        "FILE: windows drawn from FILE (static policies plan once on --loads; re-plan policies re-plan "
                        "each window from the one before)")
    p.add_argument("--replan-interval", type=int, metavar="STEPS",
                   help="with --eval-loads FILE --windows W: steps between two re-plans, which the moves are amortised "
                        f"over and must pay for themselves over (default {DEFAULT_REPLAN_INTERVAL}: the README's "
                        "--rebalance-interval; the runtime's horizon defaults to its interval)")
    p.add_argument("--layers", type=int, default=0, metavar="N",
                   help="synthetic layers per window (0: the model's; load files use all of theirs)")
    p.add_argument("--tokens-per-gpu", type=int, default=DEFAULT_TOKENS_PER_GPU, metavar="N", help="tokens per GPU in one step")
    p.add_argument("--sweep", default=DEFAULT_SWEEP, metavar="S,S|none", help="Zipf exponents of the skew sweep")
    p.add_argument("--sweep-gpus", type=int, default=32, metavar="G", help="GPU count of the skew sweep")
    p.add_argument("--sweep-layers", type=int, default=SWEEP_LAYERS, metavar="N", help="synthetic layers per window in the sweep")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic loads")
    p.add_argument("--plot", type=Path, metavar="PNG", help="PNG: time per layer vs GPUs, tokens per GPU, sweep")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables as a markdown fragment")
    p.set_defaults(run=simulate_main)


def parse_ints(text: str, flag: str, most: int = MAX_GPUS) -> list[int]:
    """'8,32' -> [8, 32], each in [1, most]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise SpecError(f"{flag}: expected comma separated integers, got {text!r}") from None
    if not 1 <= min(values) <= max(values) <= most:
        raise SpecError(f"{flag}: every value must be in [1, {most}], got {text!r}")
    return values


def parse_sweep(text: str) -> list[float]:
    """'0.6,1.0' -> [0.6, 1.0]; 'none' -> []."""
    if text == "none":
        return []
    try:
        exponents = [float(part) for part in text.split(",")]
    except ValueError:
        raise SpecError(f"--sweep: expected comma separated exponents or none, got {text!r}") from None
    if not all(math.isfinite(s) and s >= 0 for s in exponents):
        raise SpecError(f"--sweep: expected finite Zipf exponents >= 0, got {text!r}")
    return exponents


def check_windows(args: argparse.Namespace) -> tuple[int, int]:
    """(windows, re-plan interval) from --windows and --replan-interval, refused where the scenario has no use for them."""
    sampled, synthetic = args.eval_loads == SAMPLED, args.loads.startswith("zipf")
    if synthetic and args.eval_loads:
        raise SpecError(f"--eval-loads {args.eval_loads}: needs --loads FILE, got the generator {args.loads!r}")
    if args.windows is not None and not (synthetic or args.eval_loads):
        raise SpecError(f"--windows {args.windows}: needs zipf loads or --eval-loads (--loads {args.loads} alone is "
                        "scored in sample, on the whole file)")
    shifted = bool(args.eval_loads) and not sampled and args.windows is not None
    if args.replan_interval is not None and not shifted:
        raise SpecError(f"--replan-interval {args.replan_interval}: only the re-plan policies of --eval-loads FILE "
                        "--windows W use it")
    windows = 2 if args.windows is None else args.windows
    interval = DEFAULT_REPLAN_INTERVAL if args.replan_interval is None else args.replan_interval
    for flag, value, least, most in (
        ("--windows", windows, 2, MAX_WINDOWS), ("--replan-interval", interval, 1, MAX_REPLAN_INTERVAL),
        ("--tokens-per-gpu", args.tokens_per_gpu, 1, MAX_TOKENS_PER_GPU), ("--layers", args.layers, 0, MAX_LAYERS),
        ("--sweep-gpus", args.sweep_gpus, 1, MAX_GPUS), ("--sweep-layers", args.sweep_layers, 1, MAX_LAYERS),
        ("--seed", args.seed, 0, MAX_SEED),
    ):
        if value < least:
            raise SpecError(f"{flag}: must be >= {least}, got {value}")
        if value > most:
            raise SpecError(f"{flag}: must be <= {most}, got {value}")
    return windows, interval


def check_load_files(args: argparse.Namespace, model: ModelSpec) -> None:
    """Raise SpecError for a --loads or --eval-loads file that does not fit the model or has a layer of no tokens."""
    for flag, path in (("--loads", args.loads), ("--eval-loads", args.eval_loads)):
        if path and not path.startswith("zipf") and path != SAMPLED:
            check_routed(load_stats(Path(path), model), f"{flag} {path}")


def simulate_main(args: argparse.Namespace) -> int:
    """`rnq-ep simulate`: run every policy at every GPU count (+ the sweep), print, write markdown/plot."""
    from rnq_ep.report import check_folder, console, print_table
    from rnq_ep.simulate_plot import plot_study

    for path, flag in ((args.markdown, "--markdown"), (args.plot, "--plot")):
        check_folder(path, flag)
    num_windows, interval = check_windows(args)
    model = load_model(args.model)
    check_load_files(args, model)
    base = load_cluster(args.cluster or DEFAULT_CLUSTER)
    if args.cluster and not args.gpus:
        clusters = [base]  # the named cluster as it is
    else:
        clusters = [scaled_cluster(base, g) for g in parse_ints(args.gpus or DEFAULT_GPUS, "--gpus")]
    exponents = parse_sweep(args.sweep)
    layers = args.layers or model.num_layers
    synthetic = parse_zipf(args.loads) if args.loads.startswith("zipf") else None
    sampled = args.eval_loads == SAMPLED
    eval_path = None if sampled or not args.eval_loads else Path(args.eval_loads)
    shifted = eval_path is not None and args.windows is not None
    real = None if synthetic or sampled else real_windows(model, Path(args.loads), eval_path)
    recorded = load_stats(Path(args.loads), model) if sampled else None
    show = console()
    runs_by_gpus = {}
    for cluster in clusters:
        g, tokens = cluster.num_gpus, cluster.num_gpus * args.tokens_per_gpu
        if sampled:
            windows = drawn_windows(recorded, num_windows, tokens, args.seed)
        elif shifted:
            windows = shifted_windows(*real[0], num_windows, tokens, args.seed)
        else:
            windows = real or synthetic_windows(model, synthetic, layers, num_windows, tokens, args.seed)
        with show.status(f"{model.name}: {len(windows)} window(s) on {g} GPUs"):
            runs_by_gpus[g] = run_all(model, cluster, windows, args.tokens_per_gpu, POLICIES)
            if shifted:
                runs_by_gpus[g] += [run_replanning(p, model, cluster, windows, args.tokens_per_gpu, interval)
                                    for p in REPLAN_POLICIES]
    if synthetic:
        source = f"{synthetic.label}, {layers} layers, {num_windows} windows (plan on one, score on the next)"
    elif sampled:
        source = (f"{num_windows} windows of GPUs x {args.tokens_per_gpu} tokens drawn from {Path(args.loads).name} "
                  "(stationary: plan on one, score on the next)")
    elif shifted:
        source = (f"planned on {Path(args.loads).name}, scored on {num_windows} windows of GPUs x {args.tokens_per_gpu} "
                  f"tokens drawn from {eval_path.name} (a shift of domain; re-plan every {interval} steps)")
    elif eval_path:
        source = f"planned on {Path(args.loads).name}, scored on {eval_path.name}"
    else:
        source = f"{Path(args.loads).name} (in sample: planned and scored on the same file)"
    tables = [scale_table(runs_by_gpus, model, f"rnq-ep simulate: {model.name} on {base.name}-like nodes, {source}, "
                          f"{args.tokens_per_gpu} tokens/GPU/step")]
    sweep = {}
    sweep_cluster = scaled_cluster(base, args.sweep_gpus)
    drift = synthetic.drift if synthetic else DEFAULT_DRIFT
    for s in exponents:
        windows = synthetic_windows(model, ZipfLoads(s, drift), args.sweep_layers, 2, args.sweep_gpus * args.tokens_per_gpu,
                                    args.seed)
        with show.status(f"sweep: Zipf s={s:g} on {args.sweep_gpus} GPUs"):
            sweep[s] = (expert_skew(windows), run_all(model, sweep_cluster, windows, args.tokens_per_gpu, POLICIES))
    if sweep:
        tables.append(sweep_table(sweep, args.sweep_gpus, f"Skew sweep: {model.name}, Zipf windows with hot-set drift {drift:g}, {args.sweep_layers} layers"))
    for table in tables:
        print_table(table)
    if args.plot:
        plot_study(runs_by_gpus, sweep, args.plot, model.name)
    if args.markdown:
        write_markdown(args, tables, model.name)
    return 0


def write_markdown(args: argparse.Namespace, tables: list[BenchTable], model_name: str) -> None:
    """The tables as a markdown fragment with command, machine and date (and the plot, linked relative)."""
    from rnq_ep.report import cpu_name

    machine = f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"
    command = shlex.join(["rnq-ep", *getattr(args, "argv", ["simulate", *sys.argv[1:]])])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = to_markdown(tables, command, machine, date)
    if args.plot:
        text += f"\n![{model_name} simulation]({os.path.relpath(args.plot, args.markdown.resolve().parent)})\n"
    write_atomic(args.markdown, text.encode())


def main(argv: list[str] | None = None) -> int:
    """`python -m rnq_ep.simulate ...`, the same as `rnq-ep simulate ...`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="rnq-ep simulate", description=__doc__.splitlines()[0])
    add_simulate_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = ["simulate", *argv]
    try:
        return simulate_main(args)
    except (SpecError, OSError) as err:
        sys.stderr.write(f"rnq-ep simulate: error: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
