"""`rnq-ep run` under torchrun: read the rank from the standard env, call run_worker, report on rank 0.

    torchrun --nproc-per-node=4 -m rnq_ep.runtime.torchrun --plan plan.json --loads loads.json
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console
from rich.table import Table

from rnq_ep.routing import POLICIES
from rnq_ep.runtime.worker import StepStats, run_worker
from rnq_ep.specs import SpecError

log = logging.getLogger(__name__)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `rnq-ep run` (torchrun mode)."""
    parser.add_argument("--plan", required=True, help="plan JSON from `rnq-ep plan`")
    parser.add_argument("--model", help="model name (configs/models) or TOML path; default: the plan's model")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    parser.add_argument("--steps", type=int, default=5, help="steps to run")
    parser.add_argument("--loads", help="load JSON whose per-layer counts the routing follows; default uniform")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and batches")
    parser.add_argument("--policy", choices=POLICIES, default="least-loaded", help="copy choice per token")
    parser.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto", help="expert kernels")


def run_main(args: argparse.Namespace) -> int:
    """Run this process's rank (RANK/WORLD_SIZE from the env, 0/1 without torchrun); 0 on success, 2 on bad input."""
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        stats = run_worker(
            rank, world_size, args.plan, args.model, args.tokens, args.steps,
            args.loads, args.seed, args.policy, args.backend,
        )
    except SpecError as err:
        log.error("rank %d: %s", rank, err)
        return 2
    if rank == 0:
        Console().print(steps_table(stats, title=f"rnq-ep run: {world_size} ranks, policy {args.policy}"))
    return 0


def steps_table(stats: list[StepStats], title: str) -> Table:
    """Rich table of per-step time, balancedness, tokens per GPU and this rank's bytes sent."""
    table = Table(title=title)
    for column in ("step", "seconds", "balancedness", "tokens per GPU", "bytes sent", "no dedupe"):
        table.add_column(column, justify="right")
    for s in stats:
        table.add_row(
            str(s.step), f"{s.seconds:.4f}", f"{s.balancedness:.3f}", " ".join(map(str, s.tokens_per_gpu.tolist())),
            f"{s.bytes_sent:,}", f"{s.bytes_sent_no_dedupe:,}",
        )
    return table


def main(argv: list[str] | None = None) -> int:
    """`python -m rnq_ep.runtime.torchrun ...`: the run subcommand without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="python -m rnq_ep.runtime.torchrun", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
