"""Policy comparison (plain EP, EPLB-equivalents, R&Q) shared by `rnq-ep plan` and `rnq-ep bench planner`.

`compare_policies` plans one load with every policy, times each planner and scores every plan on
the evaluation load (metrics + cost model). The bench adds planner speed at DeepSeek-V3 scale on
synthetic Zipf loads and balance on the shipped real load files; tables come back as `BenchTable`s
that the CLI prints with rich and `to_markdown` writes for BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np

if TYPE_CHECKING:
    from rich.console import Console

from rnq_ep.costmodel import DEFAULT_TOKENS_PER_GPU, predict_plan
from rnq_ep.memory import gpu_budget
from rnq_ep.metrics import PlanScore, score_plan
from rnq_ep.planner import plan_eplb, plan_plain_ep, plan_rnq
from rnq_ep.specs import (
    CONFIG_DIR,
    ClusterSpec,
    LoadStats,
    ModelSpec,
    Plan,
    PlanOptions,
    SpecError,
    load_model,
    load_stats,
    write_atomic,
)

RNQ = "R&Q"
EPLB_SAME = "EPLB-equivalent, same memory"
EPLB_EXTRA = "EPLB-equivalent, +12.5 % memory"
PLAIN = "plain EP"
SUMMARY_KEYS = {PLAIN: "plain_ep", EPLB_SAME: "eplb_same_memory", EPLB_EXTRA: "eplb_extra_12_5pct", RNQ: "rnq"}
WITH_INT4 = ("bf16", "int8", "int4")  # the balance table's second R&Q column
SHIPPED_LOADS = CONFIG_DIR / "loads"
SHARED_LOADS = CONFIG_DIR.parent.parent / "shared" / "data" / "expert-loads"
# (model, plan-on file, score-on file); the same file twice means scored in sample
SHIPPED_PAIRS = (
    ("olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_arxiv.json", "olmoe-1b-7b-0924_olmoe-repo_github.json"),
    ("olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_github.json", "olmoe-1b-7b-0924_olmoe-repo_wikipedia.json"),
    ("olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_wikipedia.json", "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"),
    ("deepseek-moe-16b", "deepseek-moe-16b-base_minipile.json", "deepseek-moe-16b-base_minipile.json"),
    ("mixtral-8x7b", "mixtral-8x7b-v0.1_olmoe-repo_github.json", "mixtral-8x7b-v0.1_olmoe-repo_github.json"),
)
SHARED_PAIRS = (  # only in ../shared/data/expert-loads
    ("olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_c4.json", "olmoe-1b-7b-0924_olmoe-repo_book.json"),
    ("mixtral-8x7b", "mixtral-8x7b-v0.1_olmoe-repo_arxiv.json", "mixtral-8x7b-v0.1_olmoe-repo_github.json"),
    ("mixtral-8x7b", "mixtral-8x7b-v0.1_fiddler_mmlu-college-computer-science.json",
     "mixtral-8x7b-v0.1_fiddler_mmlu-machine-learning.json"),
)


def real_pairs() -> list[tuple[str, Path, Path]]:
    """(model, plan-on path, score-on path): the shipped files, plus the shared data set's when present."""
    pairs = [(m, SHIPPED_LOADS / a, SHIPPED_LOADS / b) for m, a, b in SHIPPED_PAIRS]
    if SHARED_LOADS.is_dir():
        pairs += [(m, SHARED_LOADS / a, SHARED_LOADS / b) for m, a, b in SHARED_PAIRS]
    return pairs


@dataclass(frozen=True)
class PolicyResult:
    """One policy's plan, planner seconds and scores on the evaluation load (error set if infeasible)."""

    name: str
    plan: Plan | None
    planner_s: float
    score: PlanScore | None
    layer_s: np.ndarray | None  # [L] predicted MoE seconds per layer
    error: str = ""


@dataclass(frozen=True)
class BenchTable:
    """A titled table of preformatted cells, printed by the CLI and written as markdown."""

    title: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    note: str = ""  # printed under the table


def with_budget(cluster: ClusterSpec, model: ModelSpec, options: PlanOptions) -> ClusterSpec:
    """The cluster with its per-GPU budget resolved to bytes, so every policy plans with the same one."""
    return msgspec.structs.replace(cluster, expert_memory_budget=gpu_budget(model, cluster, options))


def timed(planner: Callable[..., Plan], *args, **kwargs) -> tuple[Plan, float]:
    """Run a planner, return (plan, seconds)."""
    start = time.perf_counter()
    plan = planner(*args, **kwargs)
    return plan, time.perf_counter() - start


def compare_policies(
    model: ModelSpec,
    cluster: ClusterSpec,
    loads: LoadStats,
    options: PlanOptions,
    eval_loads: LoadStats | None = None,
    tokens_per_gpu: int = DEFAULT_TOKENS_PER_GPU,
) -> list[PolicyResult]:
    """Plain EP, EPLB-equivalents (same, +12.5 % memory), R&Q; a baseline that cannot plan keeps its error."""
    same_budget = with_budget(cluster, model, options)  # baselines read the budget from the cluster
    target = eval_loads if eval_loads is not None else loads
    runs = (
        (PLAIN, lambda: plan_plain_ep(model, same_budget, loads)),
        (EPLB_SAME, lambda: plan_eplb(model, same_budget, loads, extra_memory=0.0)),
        (EPLB_EXTRA, lambda: plan_eplb(model, same_budget, loads, extra_memory=0.125)),
        (RNQ, lambda: plan_rnq(model, cluster, loads, options)),
    )
    results = []
    for name, run in runs:
        try:
            plan, seconds = timed(run)
        except SpecError as err:
            if name == RNQ:
                raise
            results.append(PolicyResult(name, None, 0.0, None, None, error=str(err)))
            continue
        layer_s = predict_plan(plan, target, tokens_per_gpu=tokens_per_gpu)
        results.append(PolicyResult(name, plan, seconds, score_plan(plan, target), layer_s))
    return results


def spread(values: dict[str, float], fmt: str = "{:.2f}") -> str:
    """'min/median/max' of a metrics summary entry."""
    return "/".join(fmt.format(values[k]) for k in ("min", "median", "max"))


def policy_table(results: list[PolicyResult], budget: int, title: str, note: str = "") -> BenchTable:
    """The `rnq-ep plan` comparison: balance, LIS, predicted time vs plain EP, memory, quantized tokens."""
    header = (
        "policy",
        "balancedness, shares (min/med/max)",
        "balancedness, best split",
        "LIS",
        "MoE time, us",
        "vs plain EP",
        "max bytes/GPU (% budget)",
        "quantized tokens, max (planned / routed)",
        "planner",
    )
    plain = next((r for r in results if r.name == PLAIN and r.layer_s is not None), None)
    rows = []
    for r in results:
        if r.score is None:
            rows.append((r.name, "infeasible (below)") + ("",) * (len(header) - 2))
            note += f"\n{r.name} infeasible: {r.error}"
            continue
        s = r.score.summary()
        total = float(r.layer_s.sum())
        speedup = f"{float(plain.layer_s.sum()) / total:.2f}x" if plain and total > 0 else "n/a"
        top = s["max_bytes_per_gpu"]["max"]
        rows.append((
            r.name,
            spread(s["balancedness_shares"]),
            spread(s["balancedness_best"]),
            spread(s["lis"]),
            f"{total * 1e6:,.0f}",
            speedup,
            f"{human_bytes(top)} ({100 * top / budget:.1f} %)",
            f"{100 * s['quantized_fraction_shares']['max']:.1f} % / {100 * s['quantized_fraction']['max']:.1f} %",
            f"{r.planner_s:.2f} s" if r.planner_s >= 1 else f"{r.planner_s * 1e3:.1f} ms",
        ))
    return BenchTable(title, header, rows, note)


def human_bytes(size: float) -> str:
    """Bytes as KiB/MiB/GiB with 3 significant digits."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def plan_summary(results: list[PolicyResult], budget: int, tokens_per_gpu: int) -> dict:
    """The PLAN.json `summary`: R&Q's scores at top level, every policy's under 'policies'."""
    policies = {}
    for r in results:
        key = SUMMARY_KEYS[r.name]
        if r.score is None:
            policies[key] = {"error": r.error}
            continue
        policies[key] = {
            **r.score.summary(),
            "predicted_moe_seconds": float(r.layer_s.sum()),
            "planner_seconds": r.planner_s,
        }
    rnq, plain = policies["rnq"], policies["plain_ep"]
    speedup = plain["predicted_moe_seconds"] / rnq["predicted_moe_seconds"] if "error" not in plain else None
    return {"memory_budget_bytes": budget, "tokens_per_gpu": tokens_per_gpu, **rnq,
            "speedup_vs_plain_ep": speedup, "policies": policies}


def zipf_loads(model: ModelSpec, num_layers: int, rng: np.random.Generator, tokens: int) -> LoadStats:
    """Synthetic loads: per layer a shuffled Zipf profile whose max/mean is drawn from [5, 10]."""
    ranks = np.arange(1, model.num_experts + 1, dtype=np.float64)
    counts = []
    for _ in range(num_layers):
        target = rng.uniform(5.0, 10.0)
        low, high = 0.0, 4.0  # bisect the exponent: max/mean grows with it
        for _ in range(50):
            mid = (low + high) / 2
            weight = ranks**-mid
            low, high = (mid, high) if weight[0] / weight.mean() < target else (low, mid)
        weight = ranks**-low
        counts.append(rng.multinomial(tokens, rng.permutation(weight / weight.sum())).tolist())
    return LoadStats(counts=counts, num_experts=model.num_experts, top_k=model.top_k, model=f"synthetic Zipf ({model.name})")


def scaled_cluster(base: ClusterSpec, num_gpus: int) -> ClusterSpec:
    """`base` with as many nodes of its node size as `num_gpus` needs, budget as plain EP."""
    nodes = math.ceil(num_gpus / base.gpus_per_node)
    per_node = base.gpus_per_node if num_gpus >= base.gpus_per_node else num_gpus
    return msgspec.structs.replace(
        base, name=f"{base.name}-{num_gpus}", nodes=nodes, gpus_per_node=per_node, expert_memory_budget="plain-ep"
    )


def balance_table(cluster: ClusterSpec, options: PlanOptions, pairs: list[tuple[str, Path, Path]]) -> BenchTable:
    """Best-split balancedness (median over layers) and predicted speedup on real load files; R&Q also
    with int4 allowed (`WITH_INT4`), the EPLB-equivalent +12.5 % of the same run as the baseline."""
    header = ("model", "planned on -> scored on", "layers", PLAIN, EPLB_SAME, EPLB_EXTRA, RNQ, "R&Q vs its LP bound",
              "R&Q / EPLB +12.5 %", "same, mean over layers", f"R&Q {'+'.join(WITH_INT4)}",
              "R&Q +int4 / EPLB +12.5 %", "R&Q speedup vs plain EP")
    with_int4 = msgspec.structs.replace(options, formats=WITH_INT4)
    rows = []
    for model_name, plan_file, eval_file in pairs:
        model = load_model(model_name)
        loads, target = load_stats(plan_file, model), load_stats(eval_file, model)
        results = {r.name: r for r in compare_policies(model, cluster, loads, options, eval_loads=target)}
        best = {n: float(np.median(r.score.balancedness_best)) if r.score else math.nan for n, r in results.items()}
        rnq, eplb = results[RNQ].score, results[EPLB_EXTRA].score
        gap = float(np.max(rnq.best_loads.max(axis=1) / rnq.lp_max_load - 1.0))
        speedup = float(results[PLAIN].layer_s.sum() / results[RNQ].layer_s.sum()) if results[PLAIN].score else math.nan
        int4 = float(np.median(score_plan(plan_rnq(model, cluster, loads, with_int4), target).balancedness_best))
        rows.append((
            model_name, f"{short(plan_file.name)} -> {short(eval_file.name)}", str(len(loads.counts)),
            *(f"{best[n]:.3f}" for n in (PLAIN, EPLB_SAME, EPLB_EXTRA, RNQ)),
            f"+{100 * gap:.2f} %", f"{best[RNQ] / best[EPLB_EXTRA]:.3f}",
            f"{rnq.balancedness_best.mean() / eplb.balancedness_best.mean():.3f}",
            f"{int4:.3f}", f"{int4 / best[EPLB_EXTRA]:.3f}", f"{speedup:.2f}x",
        ))
    title = f"Balance on real loads (configs/loads, shared/data/expert-loads), {cluster.name}, memory as plain EP, best-split balancedness median over layers"
    return BenchTable(title, header, rows)


def short(file_name: str) -> str:
    """The corpus part of a load file name: 'olmoe-..._olmoe-repo_arxiv.json' -> 'arxiv'."""
    return Path(file_name).stem.rsplit("_", 1)[-1]


def to_markdown(tables: list[BenchTable], command: str, machine: str, date: str) -> str:
    """Markdown fragment: command, machine, date, then each table."""
    lines = [f"Command: `{command}`  ", f"Machine: {machine}  ", f"Date: {date}", ""]
    for table in tables:
        lines += [f"**{table.title}**", "", "| " + " | ".join(table.header) + " |",
                  "|" + "---|" * len(table.header)]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines += ["", *(f"_{line}_  " for line in table.note.splitlines()), ""] if table.note else [""]
    return "\n".join(lines)


def publish(tables: list[BenchTable], command: str, console: Console, markdown_path: Path | None) -> str:
    """Markdown of `tables` with command, machine and date: printed, and written to `markdown_path` if given."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    markdown = to_markdown(tables, command.strip(), machine, date)
    console.print(markdown, markup=False, soft_wrap=True)
    if markdown_path is not None:
        write_atomic(markdown_path, markdown.encode())
    return markdown
