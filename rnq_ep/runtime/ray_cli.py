"""`rnq-ep run --ray [ADDRESS]`: the Ray flags of `rnq-ep run`, a live step table and the summary tables.

    rnq-ep run --ray --plan plan.json --loads loads.json              # local cluster, CPU workers, gloo
    rnq-ep run --ray 10.0.0.1:6379 --plan plan.json --max-restarts 1  # an existing cluster
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from rnq_ep.report import console
from rnq_ep.runtime.options import options_from_args
from rnq_ep.runtime.ray_cluster import ClusterError, RayJob, connect
from rnq_ep.runtime.ray_driver import Event, JobResult, WorkerFailed, check_job_flags, job_for, run_job
from rnq_ep.runtime.torchrun import REBALANCE_COLUMNS, check_hf_flags, rebalance_cells
from rnq_ep.runtime.worker import StepStats
from rnq_ep.specs import SpecError


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Ray options of `rnq-ep run` (the rest are torchrun's: --plan, --model, --tokens, --steps, --loads, ...)."""
    parser.add_argument("--hf", metavar="PATH|tiny-<family>",
                        help="convert this transformers model (folder or tiny-<family>) for the plan and generate --steps tokens "
                        "after a --tokens-long builtin-text prompt per worker")
    parser.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                        help="run on Ray: the cluster at ADDRESS (HOST:PORT or auto), or with no address a local one")
    parser.add_argument("--max-restarts", type=int, default=0, metavar="N",
                        help="rebuild the worker group and replay the job up to N times after a worker fails")
    parser.add_argument("--cpus-per-worker", type=float, metavar="C",
                        help="CPUs reserved per CPU worker (default: the cluster's CPUs / workers, at most 1)")
    parser.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the local cluster (default: all)")


def ray_main(args: argparse.Namespace) -> int:
    """Run the plan on Ray and print the summary; 0 ok, 1 a worker failed, 2 bad input or cluster.

    Flags and files are checked before Ray starts; after a second worker failure (no restarts left) the steps
    every worker finished are printed before the error line.
    """
    out = console()
    finished: list[list[StepStats]] = []  # [step][rank], kept across restarts
    try:
        options = options_from_args(args)
        if args.hf:
            check_hf_flags(args)
        check_job_flags(args.max_restarts, args.cpus_per_worker)
        job = job_for(options, args.hf)
        if args.check:
            return 0
        connect(args.ray or None, args.num_cpus)
        result = run_live(job, args.max_restarts, args.cpus_per_worker, out, finished=finished)
    except (ClusterError, SpecError) as err:
        sys.stderr.write(shown(f"rnq-ep run: error: {err}\n", sys.stderr))
        return 2
    except WorkerFailed as err:
        if finished:
            out.print(steps_table(finished, f"{Path(args.plan).name} on Ray: the {len(finished)} step(s) every worker "
                                  "finished before the job stopped"))
        sys.stderr.write(shown(f"rnq-ep run: worker failed: {err}\n", sys.stderr))
        return 1
    title = f"{Path(args.plan).name} on Ray: {len(result.workers)} workers, policy {args.policy}"
    title += f", spill {args.spill}" if args.spill else ""
    if args.hf:
        out.print(generation_table(result, f"{title}, {args.hf}"))
        return 0
    out.print(steps_table([list(by_rank) for by_rank in zip(*result.stats)], title))
    out.print(workers_table(result))
    return 0


ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # colour and cursor codes, as Ray puts in its error texts


def shown(text: str, stream: TextIO) -> str:
    """`text` as written to `stream`: Ray's ANSI colour codes removed unless the stream is a terminal."""
    return text if stream.isatty() else ANSI_ESCAPE.sub("", text)


def run_live(job: RayJob, max_restarts: int, cpus_per_worker: float | None, out: Console, label: str = "ray job",
             finished: list[list[StepStats]] | None = None) -> JobResult:
    """run_job with a live view: a table that gains a row as each step finishes on every rank, the phase and elapsed time.

    finished: [step][rank] stats of the steps every rank finished, appended as they finish (kept on a failure too).
    """
    finished = [] if finished is None else finished
    phase = [f"{label}: connecting"]
    spinner = Spinner("dots")
    started = time.monotonic()

    def view() -> Group:
        spinner.update(text=f"{phase[0]} ({time.monotonic() - started:.0f} s)")
        return Group(steps_table(finished, f"{label}: steps finished on every worker"), spinner) if finished else Group(spinner)

    with Live(console=out, transient=True, get_renderable=view, refresh_per_second=4) as live:

        def show(event: Event) -> None:
            if event.kind == "step":
                finished.extend(event.step_stats)
            else:
                style = {"failed": "red", "restarting": "yellow", "done": "green"}.get(event.kind)
                text = shown(f"{label} attempt {event.attempt}: {event.message}", out.file)
                live.console.print(Text(text, style=style or ""))
                phase[0] = f"{label}: {event.kind}"
            live.refresh()

        return run_job(job, max_restarts, cpus_per_worker, show)


def steps_table(steps: list[list[StepStats]], title: str) -> Table:
    """A row per step (and plan, if several) of [row][rank] stats: rank 0's time, balancedness, expert rows per worker; all ranks' bytes."""
    rebalancing = any(s[0].rebalance is not None for s in steps)
    plans = any(s[0].plan for s in steps)
    spilling = any(s[0].spilling for s in steps)
    table = Table(title=title, title_justify="left")
    columns = ["step"] + (["plan"] if plans else []) + ["seconds", "balancedness",
                                                         "expert rows per worker (tokens x top_k x layers)",
                                                         "bytes sent (all ranks)"]
    for column in columns + (["MB spilled"] if spilling else []) + (REBALANCE_COLUMNS if rebalancing else []):
        table.add_column(column, justify="right")
    for by_rank in steps:
        first = by_rank[0]
        row = [str(first.step)] + ([str(first.plan)] if plans else []) + [
            f"{first.seconds:.4f}", f"{first.balancedness:.3f}", " ".join(map(str, first.tokens_per_gpu.tolist())),
            f"{sum(s.bytes_sent for s in by_rank):,}", *([f"{first.spilled_bytes / 1e6:.2f}"] if spilling else [])]
        table.add_row(*row, *(rebalance_cells(first) if rebalancing else []))
    return table


def workers_table(result: JobResult) -> Table:
    """Per worker over all steps: where it ran, rows computed, bytes sent, CPU seconds in its experts."""
    resumed = "".join(f", resumed at step {step}" for step in result.first_steps[1:])
    caption = f"restarts: {result.restarts}{resumed}; step time median {np.median([s.seconds for s in result.stats[0]]):.4f} s"
    table = Table(title="workers", title_justify="left", caption=caption, caption_justify="left")
    for column in ("rank", "node", "pid", "expert rows computed", "bytes sent", "expert CPU s"):
        table.add_column(column, justify="right")
    for info, rank_stats in zip(result.workers, result.stats):
        tokens = int(sum(s.tokens_per_gpu[info.rank] for s in rank_stats))
        table.add_row(str(info.rank), info.node_ip, str(info.pid), f"{tokens:,}",
                      f"{sum(s.bytes_sent for s in rank_stats):,}", f"{sum(s.expert_cpu_seconds for s in rank_stats):.3f}")
    return table


def generation_table(result: JobResult, title: str) -> Table:
    """Per worker of an hf job: where it ran, its greedy tokens, time, speed and mean balancedness over layers."""
    table = Table(title=title, title_justify="left", caption=f"restarts: {result.restarts}", caption_justify="left")
    for column in ("rank", "node", "last token ids", "seconds", "tokens/s", "balancedness"):
        table.add_column(column, justify="right")
    for info, report in zip(result.workers, result.stats):
        generated = report.tokens[0, -min(8, report.tokens.shape[1]):].tolist()
        table.add_row(str(info.rank), info.node_ip, " ".join(map(str, generated)), f"{report.seconds:.3f}",
                      f"{report.tokens_per_s:.1f}", f"{np.mean(report.balancedness):.3f}")
    return table
