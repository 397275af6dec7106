"""`rnq-ep bench e2e`: every policy users pick between, run end to end on CPU gloo workers, on real loads.

Policies are those of `rnq_ep.policies` (plain EP; EPLB-equivalent at +12.5 % and +25 % memory
with hash or least-loaded copy choice; R&Q with least-loaded routing at plain-EP memory, bf16+int8
and bf16+int8+int4; LLEP-style spilling on plain EP; R&Q bf16+int8+int4 + int8 or int4 spill). Each is
planned on one load file and run on batches whose routing follows another (or the same, labelled in
sample), under both launchers users have:
- spawn: torchrun-style spawned gloo ranks; every runnable policy built in one process group from
  the same weights and run on the same batches, interleaved step by step (`bench/e2e_runs.py`),
  outputs kept and compared with the unquantized single-process reference (fp32 dense MoE);
- ray: one Ray job per policy (`make_job`/`run_job`, the actors call `run_worker`), outputs compared too.
LLEP and R&Q + spill run as SpillMoE layers (`rnq_ep/spill.py`): every step they spill what their
routing leaves over LLEP's threshold onto the least-loaded workers, sending the expert weights along
(spawned, and on Ray with --ray-all). Every row also carries the cost model's prediction.
With a GPU, each plan also runs at world size 1 with all of its copies on the one GPU and static
routing, so each copy serves its planned share: the cost of the plan's bf16/int8/int4 kernel mix.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import numpy as np
import ray
import torch
from rich.console import Console

from rnq_ep.bench.e2e_runs import RowRun, run_ray, run_single_gpu, spawn_e2e, spill_figures
from rnq_ep.bench.layer import Measured, summarise
from rnq_ep.bench.planner import SHIPPED_LOADS, BenchTable, publish, with_budget
from rnq_ep.demo import unsharded_outputs
from rnq_ep.memory import plain_ep_budget
from rnq_ep.metrics import gpu_bytes, layer_tables
from rnq_ep.planner import plan_eplb, plan_plain_ep, plan_rnq
from rnq_ep.policies import HASH, LEAST_LOADED, LLEP, PLAIN_EP, RNQ_SPILL, POLICIES, Policy, PolicyRun, run_all
from rnq_ep.runtime.ray_cluster import connect
from rnq_ep.runtime.inputs import layer_counts
from rnq_ep.runtime.worker import StepStats
from rnq_ep.specs import ClusterSpec, LoadStats, ModelSpec, Plan, PlanOptions, SpecError, load_cluster, load_model, load_stats

LAUNCHERS = ("spawn", "ray")
# policies' rule -> routing.POLICIES name; for the spilling rules, the split before the spill
RUNTIME_ROUTING = {HASH: "hash", LEAST_LOADED: "least-loaded", LLEP: "static", RNQ_SPILL: "least-loaded"}
SPILLING = (LLEP, RNQ_SPILL)
NOT_RUN = "—"
# Ray starts fresh actors per job (10-20 s on 2 cores): by default only the baseline and the quantized plans
# (whose output error says something; bf16 plans match the reference to rounding) run as Ray jobs
RAY_DEFAULT = ("plain EP", "R&Q bf16+int8", "R&Q bf16+int8+int4")


@dataclass(frozen=True)
class Case:
    """A model and the load files its plans are made from and its batches follow."""

    model: str
    plan_loads: Path
    run_loads: Path
    label: str


CASES = {
    "olmoe": Case("olmoe-1b-7b", SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json",
                  SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_github.json",
                  "most skewed real loads; planned on arXiv, run on GitHub (out of sample)"),
    "mixtral": Case("mixtral-8x7b", SHIPPED_LOADS / "mixtral-8x7b-v0.1_olmoe-repo_github.json",
                    SHIPPED_LOADS / "mixtral-8x7b-v0.1_olmoe-repo_github.json",
                    "least skewed real loads; planned and run on GitHub (in sample)"),
    "olmoe-shift": Case("olmoe-1b-7b", SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json",
                        SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_wikipedia.json",
                        "planned on arXiv, run on Wikipedia: a shift that leaves R&Q layers over LLEP's 1.3 threshold"),
}
DEFAULT_CASES = ("olmoe", "mixtral")  # olmoe-shift: R&Q + spill moves copies from --tokens 1024 on (LLEP's 1024-row chunks)


@dataclass(frozen=True)
class Row:
    """One policy of one case: its plan (None for an infeasible plan), prediction and measurements."""

    policy: Policy
    plan: Plan | None
    predicted: PolicyRun
    measured: dict[str, Measured]  # by launcher
    error: tuple[float, float] | None = None  # (max abs, relative) vs the unquantized reference
    gpu_s: float | None = None  # world size 1 on a GPU, median step seconds
    spill: tuple[float, float, int] | None = None  # spilling rows: spill_figures of the spawn run
    note: str = ""


def plan_for(policy: Policy, model: ModelSpec, cluster: ClusterSpec, loads: LoadStats) -> Plan:
    """The plan the policy runs: placement by its planner, at its memory (the cluster's budget resolved)."""
    if policy.placement == "plain":
        return plan_plain_ep(model, cluster, loads)
    if policy.placement == "eplb":
        return plan_eplb(model, cluster, loads, extra_memory=policy.extra_memory)
    if policy.placement == "rnq":
        return plan_rnq(model, cluster, loads, PlanOptions(formats=policy.formats))
    raise ValueError(f"policy {policy.name!r}: unknown placement {policy.placement!r}, expected plain, eplb or rnq")


def plan_rows(model: ModelSpec, cluster: ClusterSpec, plan_loads: LoadStats, run_loads: LoadStats, tokens: int) -> list[Row]:
    """Every policy planned on plan_loads and predicted on run_loads (cost model); plans for the runnable ones."""
    cluster = with_budget(cluster, model, PlanOptions())
    predicted = {run.policy: run for run in run_all(model, cluster, [(plan_loads, run_loads)], tokens, POLICIES)}
    rows = []
    for policy in POLICIES:
        try:
            plan = plan_for(policy, model, cluster, plan_loads)
        except SpecError as err:
            if policy == PLAIN_EP:  # the baseline of every ratio
                raise
            rows.append(Row(policy, None, predicted[policy.name], {}, note=f"cannot plan: {err}"))
            continue
        rows.append(Row(policy, plan, predicted[policy.name], {}))
    return rows


def first_identical(rows: list[Row]) -> dict[int, int]:
    """Row index -> index of the first planned row that runs exactly the same (same copies; same routing where any expert
    has copies or the routing spills; same spill format)."""
    first: dict[tuple[bytes, str, str], int] = {}
    out = {}
    for i, row in enumerate(rows):
        if row.plan is None:
            continue
        replicated = any(len(layer.slots) > row.plan.model.num_experts for layer in row.plan.layers)
        spills = row.policy.routing in SPILLING
        key = (msgspec.json.encode(row.plan.layers), row.policy.routing if replicated or spills else "",
               row.policy.spill_fmt if spills else "")
        out[i] = first.setdefault(key, i)
    return out


def output_error(outputs: list[list[torch.Tensor]], reference: list[list[torch.Tensor]]) -> tuple[float, float]:
    """(max |out - ref|, ||out - ref|| / ||ref||) over every rank and step: outputs [rank][step] -> [T, H]."""
    out = torch.cat([o.float().flatten() for steps in outputs for o in steps])
    ref = torch.cat([r.float().flatten() for steps in reference for r in steps])
    diff = out - ref
    return float(diff.abs().max()), float(diff.norm() / ref.norm())


def run_spawn(rows: list[Row], counts: list[np.ndarray], ranks: int, tokens: int, steps: int, seed: int) -> list[list[list[StepStats]]]:
    """The runnable rows interleaved on spawned gloo ranks (steps + 1, the first warms up), outputs kept: stats [row][rank][step]."""
    runs = [RowRun(r.plan, RUNTIME_ROUTING[r.policy.routing], r.policy.spill_fmt if r.policy.routing in SPILLING else None)
            for r in rows]
    per_rank = spawn_e2e(ranks, runs, counts, tokens, steps, seed)  # [rank][row][step]
    return [[rank[i] for rank in per_rank] for i in range(len(rows))]


def run_case(case: Case, args: argparse.Namespace, console: Console) -> BenchTable:
    """Plan, predict and run every policy of one case under the chosen launchers; its table."""
    base = load_model(case.model)
    model = msgspec.structs.replace(base, name=f"{base.name}@{args.hidden}x{args.inter}",
                                    hidden_size=args.hidden, moe_intermediate_size=args.inter)
    cluster = msgspec.structs.replace(load_cluster(args.cluster), nodes=1, gpus_per_node=args.ranks)
    plan_loads, run_loads = load_stats(case.plan_loads), load_stats(case.run_loads)
    rows = plan_rows(model, cluster, plan_loads, run_loads, args.tokens)
    same = first_identical(rows)
    runnable = sorted(set(same.values()))
    launchers = LAUNCHERS if args.launcher == "both" else (args.launcher,)
    counts = layer_counts(rows[0].plan, run_loads)
    reference = unsharded_outputs(rows[0].plan, model, run_loads, args.ranks, args.tokens, args.steps + 1, args.seed)
    if "spawn" in launchers:
        with console.status(f"{case.model}: {len(runnable)} policies interleaved on {args.ranks} spawned gloo ranks"):
            spawned = run_spawn([rows[i] for i in runnable], counts, args.ranks, args.tokens, args.steps, args.seed)
        for i, stats in zip(runnable, spawned):
            rows[i].measured["spawn"] = summarise(stats)
            spill = spill_figures(stats, model, layer_tables(rows[i].plan)) if rows[i].policy.routing in SPILLING else None
            rows[i] = replace(rows[i], error=output_error([[s.output for s in rank] for rank in stats], reference), spill=spill)
    not_spilling = [i for i in runnable if rows[i].policy.routing not in SPILLING]  # one GPU has no one to spill to
    with tempfile.TemporaryDirectory(prefix="rnq-ep-e2e-") as tmp:
        folder = Path(tmp)
        if "ray" in launchers:
            for i in (i for i in runnable if args.ray_all or rows[i].policy.name in RAY_DEFAULT):
                policy = rows[i].policy
                spill_fmt = policy.spill_fmt if policy.routing in SPILLING else None
                with console.status(f"{case.model}: {policy.name} as a Ray job of {args.ranks} workers"):
                    stats = run_ray(rows[i].plan, RUNTIME_ROUTING[policy.routing], folder, case.run_loads, args.tokens,
                                    args.steps, args.seed, args.timeout, spill_fmt)
                rows[i].measured["ray"] = summarise(stats)
                if policy.routing in SPILLING and rows[i].spill is None:  # spawn's figures, when it ran
                    rows[i] = replace(rows[i], spill=spill_figures(stats, model, layer_tables(rows[i].plan)))
                if rows[i].error is None:  # spawn's, when it ran: the same batches and weights
                    rows[i] = replace(rows[i], error=output_error([[s.output for s in rank] for rank in stats], reference))
        if torch.cuda.is_available():
            run_single_gpu(rows[0].plan, folder, case.run_loads, args.tokens * args.ranks, 1, args.seed)  # CUDA context, compiles
            for i in not_spilling:
                gpu_s = run_single_gpu(rows[i].plan, folder, case.run_loads, args.tokens * args.ranks, args.steps, args.seed)
                rows[i] = replace(rows[i], gpu_s=gpu_s)
    for i, j in same.items():
        if i != j:
            rows[i] = replace(rows[j], policy=rows[i].policy, predicted=rows[i].predicted,
                              note=f"the same copies and routing as {rows[j].policy.name}: measured once")
    return e2e_table(rows, model, args.ranks, case, args.tokens, launchers)


def speedup(base: float | None, value: float | None) -> str:
    """'1.23x' (plain EP's time over the row's: > 1 is faster), or a dash when either is missing."""
    if base is None or value is None or not np.isfinite(base) or not np.isfinite(value) or value <= 0:
        return NOT_RUN
    return f"{base / value:.2f}x"


def memory_ratio(row: Row, model: ModelSpec, budget: int) -> str:
    """Largest per-GPU expert bytes over layers / plain EP's budget (spilling rows: with the copies spilled in the run)."""
    if row.spill is not None:
        peak = row.spill[2]
    elif row.plan is not None:
        peak = max(int(gpu_bytes(model, table).max()) for table in layer_tables(row.plan))
    else:
        peak = row.predicted.max_bytes_per_gpu
    return f"{peak / budget:.3f}" if peak else NOT_RUN


def weights_moved(row: Row) -> str:
    """'MB (copies)' of expert weights the row's spill moved per step; 0 for a row that does not spill."""
    if row.spill is not None:
        return f"{row.spill[0]:.2f} ({row.spill[1]:g})"
    return "0" if row.measured else NOT_RUN


def e2e_table(rows: list[Row], model: ModelSpec, ranks: int, case: Case, tokens: int, launchers: tuple[str, ...]) -> BenchTable:
    """One case's table: speedups vs plain EP (row 0) predicted and measured, balance, bytes, output error."""
    base = rows[0]
    gpu = any(r.gpu_s is not None for r in rows)
    header = ("policy", "memory / plain EP", "predicted speedup (cost model)",
              *(f"{name} {kind} speedup" for name in launchers for kind in ("wall", "critical")),
              "max/mean tokens per worker", "MB sent (dedupe / none)", "weights moved MB/step (copies)", "max abs error",
              "relative error",
              *(("GPU x1 speedup (kernel mix)",) if gpu else ()))
    budget = plain_ep_budget(model, ranks)
    table_rows = []
    for row in rows:
        any_run = next(iter(row.measured.values()), None)  # balance and bytes do not depend on the launcher
        cells = [row.policy.name, memory_ratio(row, model, budget), speedup(base.predicted.layer_s, row.predicted.layer_s)]
        for name in launchers:
            m, b = row.measured.get(name), base.measured.get(name)
            cells += [speedup(b and b.wall_s, m and m.wall_s), speedup(b and b.critical_s, m and m.critical_s)]
        cells += [f"{any_run.balancedness:.2f}" if any_run else NOT_RUN,
                  f"{any_run.mb_sent:.1f} / {any_run.mb_sent_no_dedupe:.1f}" if any_run else NOT_RUN, weights_moved(row),
                  f"{row.error[0]:.2e}" if row.error else NOT_RUN, f"{row.error[1]:.2e}" if row.error else NOT_RUN]
        if gpu:
            cells.append(speedup(base.gpu_s, row.gpu_s))
        table_rows.append(tuple(cells))
    title = (f"End to end, {ranks} CPU gloo workers, {model.name} ({model.num_experts} experts, top-{model.top_k}), "
             f"{tokens} tokens per worker, {len(base.plan.layers)} layers: {case.label}")
    notes = [f"{row.policy.name}: {row.note}" for row in rows if row.note]
    notes.append("speedup = plain EP's time / the policy's (> 1 is faster), each measured in the same run; wall: barrier "
                 f"to barrier with {ranks} workers on {os.cpu_count()} cores, so it hides imbalance; critical: per layer "
                 "the slowest worker's expert CPU time, summed (one core per worker); predicted: the cost model "
                 f"(`rnq_ep.costmodel`) on the {base.plan.cluster.name} cluster for the same step. spawn: all policies "
                 "interleaved in one set of spawned ranks; ray: one Ray job per policy, run one after another, so its "
                 "ratios carry more of the host's noise. Error: vs the unquantized single-process fp32 reference, every "
                 "worker and step of the spawn run (else the Ray run; relative: L2 norm ratio). LLEP and R&Q + spill run "
                 "as SpillMoE (`rnq_ep/spill.py`): per step, when max/mean worker load > 1.3, the excess moves to the "
                 "least-loaded workers in chunks of >= 1024 (token, expert) rows, each new copy's weights sent in the "
                 "step (bf16, or int8/int4 quantized by the sender); weights moved: median per step over all layers and "
                 "workers; their wall time includes the counts all-gather and the weight exchange, critical does not; "
                 "memory: with the spilled copies a worker held (from the spawn run, else the Ray run).")
    if not gpu:
        notes.append("GPU x1 (the plan's copies on one GPU, to measure the kernel mix): not run, no GPU on this machine.")
    return BenchTable(title, header, table_rows, "\n".join(notes))


def build_parser() -> argparse.ArgumentParser:
    """Options of `rnq-ep bench e2e`."""
    p = argparse.ArgumentParser(prog="rnq-ep bench e2e", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(DEFAULT_CASES), help="load cases to run")
    p.add_argument("--launcher", choices=(*LAUNCHERS, "both"), default="both", help="spawned gloo ranks, Ray actors, or both")
    p.add_argument("--ray-all", action="store_true", help="every policy as a Ray job (default: plain EP and the R&Q plans)")
    p.add_argument("--ranks", type=int, default=4, help="workers")
    p.add_argument("--cluster", default="cpu4", help="cluster whose links the plans and predictions assume; resized to --ranks")
    p.add_argument("--hidden", type=int, default=256, help="expert hidden size (scaled down for CPU)")
    p.add_argument("--inter", type=int, default=512, help="expert intermediate size (scaled down for CPU)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per worker per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per policy (plus one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="bound on each phase of a Ray job, seconds")
    p.add_argument("--markdown", type=Path, help="also write the tables as a markdown fragment")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every case, print one markdown table per load case; 0 on success."""
    args = build_parser().parse_args(argv)
    console = Console(highlight=False)
    owns_ray = args.launcher != "spawn" and not ray.is_initialized()
    if owns_ray:
        connect(None, None)  # a local Ray cluster, or RAY_ADDRESS's
    try:
        tables = [run_case(CASES[name], args, console) for name in args.cases]
    finally:
        if owns_ray:
            ray.shutdown()
    publish(tables, "rnq-ep bench e2e " + " ".join(argv if argv is not None else sys.argv[1:]), console, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
