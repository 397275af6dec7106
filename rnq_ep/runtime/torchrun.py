"""`rnq-ep run` under torchrun: read the rank from the standard env, call run_worker, report on rank 0.

    torchrun --nproc-per-node=4 -m rnq_ep.runtime.torchrun --plan plan.json --loads loads.json
    torchrun --nproc-per-node=2 -m rnq_ep.runtime.torchrun --plan plan.json --hf tiny-mixtral

With --hf (a transformers model folder or tiny-<family>) each rank converts that model for the
plan and greedily generates --steps tokens after a --tokens-long builtin-text prompt of its own.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch.distributed as dist
from rich.table import Table

from rnq_ep.rebalance.options import add_rebalance_arguments, rebalance_flags_given
from rnq_ep.report import console
from rnq_ep.routing import POLICIES
from rnq_ep.layout import TRANSPORTS
from rnq_ep.runtime.options import BACKENDS, TRANSPORT_HELP, RunOptions, check_inputs, options_from_args
from rnq_ep.runtime.worker import StepStats, _device, join_group, leave_group, run_worker
from rnq_ep.specs import FORMATS, SpecError, load_plan

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
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="expert kernels")
    parser.add_argument("--transport", choices=TRANSPORTS, default="auto", help=TRANSPORT_HELP)
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S",
                        help="collective timeout; on Ray also the longest wait for any phase before the job is stopped")
    parser.add_argument("--check", action="store_true",
                        help="check the flags, plan and load files as a run would, then exit (0 ok, 2 bad input) "
                        "without starting: launch/torchrun.sh runs this before torchrun")
    parser.add_argument("--spill", choices=FORMATS, metavar="FMT",
                        help="per step, spill what stays over 1.3x the mean GPU load onto the least-loaded GPUs, "
                        "sending expert copies in FMT (bf16|int8|int4; a quantized copy travels as stored): LLEP "
                        "with bf16 on a plain-EP plan and --policy static, R&Q + spill on an R&Q plan")
    add_rebalance_arguments(parser)


def run_main(args: argparse.Namespace) -> int:
    """Run this process's rank (RANK/WORLD_SIZE from the env, 0/1 without torchrun); 0 on success, 2 on bad input.

    Every flag and file is checked before the process group is joined; bad input is one line from local rank 0
    (each rank finds the same), and every rank exits 2.
    """
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    quiet_unless_first(rank)
    try:
        options = options_from_args(args)
        if args.hf:
            check_hf_flags(args)
        check_inputs(options, None if args.check else world_size)
    except SpecError as err:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            log.error("%s", err)
        return 2
    if args.check:
        return 0
    if args.hf:
        return run_hf_main(args, options, rank, world_size)
    try:
        stats = run_worker(rank, world_size, options)
    except SpecError as err:
        log.error("rank %d: %s", rank, err)
        return 2
    if rank == 0:
        spill = f", spill {args.spill}" if args.spill else ""
        console().print(steps_table(stats, title=f"rnq-ep run: {world_size} ranks, policy {args.policy}{spill}"))
    return 0


def quiet_unless_first(rank: int) -> None:
    """Rank 0 logs INFO lines; the other ranks only warnings and errors, so each line shows once."""
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)


def check_hf_flags(args: argparse.Namespace) -> None:
    """Raise SpecError for the flags --hf cannot honour (the model's own router routes the prompt)."""
    ignored = (["--loads"] if args.loads else []) + (["--spill"] if args.spill else []) + rebalance_flags_given(args)
    if ignored:
        raise SpecError(f"{', '.join(ignored)}: not supported with --hf (the model's own router routes the prompt)")


def run_hf_main(args: argparse.Namespace, options: RunOptions, rank: int, world_size: int) -> int:
    """--hf: convert the model on every rank, generate greedily, print rank 0's summary; 0 ok, 2 bad input."""
    from rnq_ep.hf_run import run_on_rank  # transformers is only needed here

    device = _device()
    group, created = join_group(rank, world_size, device, options.timeout_s)
    try:
        report = run_on_rank(
            args.hf, load_plan(options.plan), rank, world_size, group, batch=1, prompt_len=options.tokens,
            new_tokens=options.steps, seed=options.seed, policy=options.policy, device=device, backend=options.backend,
        )
        mine = (report.tokens[0, options.tokens:].tolist(), report.seconds, report.tokens_per_s)
        per_rank = [mine] * world_size
        if group is not None:
            dist.all_gather_object(per_rank, mine, group=group)
    except SpecError as err:
        log.error("rank %d: %s", rank, err)
        return 2
    finally:
        leave_group(created)
    if rank == 0:
        out = console()
        out.print(generation_table(per_rank, f"rnq-ep run --hf {args.hf}: {world_size} ranks, policy {args.policy}"))
        out.print(balance_table(report.balancedness))
    return 0


def generation_table(per_rank: list[tuple[list[int], float, float]], title: str) -> Table:
    """Per rank (generated ids of its prompt, seconds, tokens/s): its greedy generation."""
    table = Table(title=title, title_justify="left")
    for column in ("rank", "generated ids", "seconds", "tokens/s"):
        table.add_column(column, justify="right")
    for rank, (generated, seconds, tokens_per_s) in enumerate(per_rank):
        table.add_row(str(rank), " ".join(map(str, generated)), f"{seconds:.3f}", f"{tokens_per_s:.1f}")
    return table


def balance_table(balancedness: list[float]) -> Table:
    """Per MoE layer (model order): max/mean tokens per GPU averaged over the generation's forwards."""
    table = Table(title="balancedness per MoE layer (1.0 = even)", title_justify="left")
    for column in ("MoE layer", "balancedness"):
        table.add_column(column, justify="right")
    for layer, value in enumerate(balancedness):
        table.add_row(str(layer), f"{value:.3f}")
    return table


REBALANCE_COLUMNS = ["re-plans done", "layers switched", "MB moved", "rebalance s"]


def rebalance_cells(stats: StepStats) -> list[str]:
    """The REBALANCE_COLUMNS cells of one step (counters after it, '-' before the first)."""
    health = stats.rebalance
    counters = ["-"] * 3 if health is None else [
        str(health.replans_done), str(health.layers_switched), f"{health.bytes_moved / 1e6:.2f}"]
    return [*counters, f"{stats.rebalance_seconds:.4f}"]


def steps_table(stats: list[StepStats], title: str) -> Table:
    """Rich table of per-step time, balancedness, expert rows per GPU (tokens x top_k, summed over layers), this
    rank's bytes sent (+ online rebalancing)."""
    rebalancing = any(s.rebalance is not None for s in stats)
    spilling = any(s.spilling for s in stats)
    table = Table(title=title)
    columns = ["step", "seconds", "balancedness", "expert rows per GPU (tokens x top_k x layers)", "bytes sent",
               "no dedupe"]
    for column in columns + (["MB spilled"] if spilling else []) + (REBALANCE_COLUMNS if rebalancing else []):
        table.add_column(column, justify="right")
    for s in stats:
        row = [str(s.step), f"{s.seconds:.4f}", f"{s.balancedness:.3f}", " ".join(map(str, s.tokens_per_gpu.tolist())),
               f"{s.bytes_sent:,}", f"{s.bytes_sent_no_dedupe:,}", *([f"{s.spilled_bytes / 1e6:.2f}"] if spilling else [])]
        table.add_row(*row, *(rebalance_cells(s) if rebalancing else []))
    if rebalancing and stats[-1].rebalance is not None:
        table.caption = stats[-1].rebalance.summary()
    return table


def main(argv: list[str] | None = None) -> int:
    """`python -m rnq_ep.runtime.torchrun ...`: the run subcommand without the top-level CLI."""
    parser = argparse.ArgumentParser(prog="python -m rnq_ep.runtime.torchrun", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    # `rnq-ep run` gets --hf from the Ray flags (ray_cli.add_ray_arguments); this entry has no Ray flags
    parser.add_argument("--hf", metavar="PATH|tiny-<family>",
                        help="convert this transformers model for the plan and generate --steps tokens greedily "
                        "after a --tokens-long builtin-text prompt per rank")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
