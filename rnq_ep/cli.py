"""`rnq-ep` command line: one subcommand per product, each parsed here and run by its own module.

A subcommand is an `add_<name>(parser)` function that adds its flags and sets
`run=<function(args) -> exit code>`; list it in SUBCOMMANDS (or BENCHES for `rnq-ep bench <name>`).
Heavy modules (torch, ray, transformers) are imported only when their subcommand runs.
Exit codes: 0 ok, 1 a run failed, 2 bad input or infeasible request (one line on stderr, no partial output).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from rnq_ep.plan_command import PLAN_HELP, add_bench_planner, add_plan
from rnq_ep.report import HELP, TABLE_COLUMNS, WIDE_ENV
from rnq_ep.specs import SpecError

Subparsers = argparse._SubParsersAction  # what add_parser is called on (bench names)


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A `run` that imports `module` only when called, so `rnq-ep plan` never loads torch or ray."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


RUN_HELP = "run a plan: under torchrun (one process per rank) or on Ray (--ray)"


def add_run(p: argparse.ArgumentParser) -> None:
    """Flags of `rnq-ep run`: torchrun ranks by default, a Ray job with --ray."""
    from rnq_ep.runtime.ray_cli import add_ray_arguments
    from rnq_ep.runtime.torchrun import add_run_arguments

    p.description = (
        "Run an EP MoE model from a plan. Under `torchrun --nproc-per-node=N -m rnq_ep run ...` each "
        "process is one rank (RANK/WORLD_SIZE from the env; NCCL on GPU, gloo on CPU). With --ray [ADDRESS] the "
        "driver starts one Ray actor per GPU (or CPU worker) on the cluster at ADDRESS, or on a new local cluster."
    )
    add_run_arguments(p)
    add_ray_arguments(p)
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    """Dispatch `rnq-ep run` to Ray or to this torchrun rank (rank 0 logs per-step and rebalancing lines)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.ray is not None:
        from rnq_ep.runtime.ray_cli import ray_main

        return ray_main(args)
    from rnq_ep.runtime.torchrun import run_main

    return run_main(args)


def _module_command(
    module: str, add_arguments: str, main: str, description: str | None = None
) -> Callable[[argparse.ArgumentParser], None]:
    """A subcommand whose flags come from `module.add_arguments` and whose run is `module.main`, both imported
    only when that subcommand is parsed; description: given, or the first paragraph of the module's docstring."""

    def add(p: argparse.ArgumentParser) -> None:
        owner = importlib.import_module(module)
        p.description = description or (owner.__doc__ or "").split("\n\n")[0]
        getattr(owner, add_arguments)(p)
        p.set_defaults(run=_lazy(module, main))

    return add


CALIBRATE_HELP = "record expert loads and quantization sensitivity of a HF MoE model"
add_calibrate = _module_command(
    "rnq_ep.calibrate_command", "add_calibrate_arguments", "calibrate_main",
    "Run a transformers MoE model over calibration text and write the LoadStats JSON that "
    "`rnq-ep plan --loads` reads: routed counts, gate mass, co-activation, per-format sensitivity.",
)
SIMULATE_HELP = "cost-model scale study of every policy from 8 to 1024 GPUs"
add_simulate = _module_command("rnq_ep.simulate", "add_simulate_arguments", "simulate_main")
DEMO_HELP = "plain EP vs R&Q on a local Ray cluster of CPU workers, one per core (no GPU)"
add_demo = _module_command(
    "rnq_ep.demo", "add_demo_arguments", "demo_main",
    "Plan for one CPU worker per core at plain-EP memory from real OLMoE loads, run plain EP and R&Q "
    "on a local Ray cluster of those workers on the same batches, print them side by side, save a PNG.",
)


BENCH_HELP = "benchmarks that print ratios against a baseline run alongside"


def add_bench(p: argparse.ArgumentParser) -> None:
    """`rnq-ep bench <name>` with every entry of BENCHES."""
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for add in BENCHES:
        add(benches)


def _add_forwarded_bench(name: str, module: str, help_text: str) -> Callable[[Subparsers], None]:
    """A bench whose module parses its own flags (`main(argv) -> int`); `--help` shows them."""

    def add(benches: Subparsers) -> None:
        p = benches.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(run=lambda args: _forwarded(module, args.rest))

    return add


def _forwarded(module: str, argv: list[str]) -> int:
    """`module.main(argv)`; a SystemExit with a message (a refused flag: `raise SystemExit("...")`) is that one line
    on stderr and exit 2, not Python's exit 1."""
    try:
        return importlib.import_module(module).main(argv)
    except SystemExit as stop:
        if isinstance(stop.code, str):
            sys.stderr.write(stop.code.rstrip("\n") + "\n")
            return 2
        return 0 if stop.code is None else stop.code


# name -> (one-line help, function adding the flags); only the command being run gets its flags, so
# `rnq-ep plan` never imports torch, ray or transformers
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "plan": (PLAN_HELP, add_plan),
    "run": (RUN_HELP, add_run),
    "calibrate": (CALIBRATE_HELP, add_calibrate),
    "simulate": (SIMULATE_HELP, add_simulate),
    "demo": (DEMO_HELP, add_demo),
    "bench": (BENCH_HELP, add_bench),
}
BENCHES = [
    add_bench_planner,
    _add_forwarded_bench("kernels", "rnq_ep.bench.kernels", "Triton grouped SwiGLU kernels vs baselines (CUDA GPU)"),
    _add_forwarded_bench("layer", "rnq_ep.bench.layer", "EP layer on CPU gloo ranks: plain EP vs EPLB vs R&Q"),
    _add_forwarded_bench("e2e", "rnq_ep.bench.e2e", "every policy on 4 CPU workers (spawned and Ray) on real loads"),
    _add_forwarded_bench("step", "rnq_ep.bench.step", "one layer step: host us, syncs, kernel launches (old/exact/capacity)"),
    _add_forwarded_bench("rebalance", "rnq_ep.bench.rebalance", "online re-plan: step time during a switch vs steady"),
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `rnq-ep` parser; every subcommand is listed, only `command` gets its flags."""
    parser = argparse.ArgumentParser(prog="rnq-ep", description="Expert-parallel MoE inference with "
                                     "Replicate-and-Quantize load balancing.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add) in SUBCOMMANDS.items():
        p = subparsers.add_parser(name, help=help_text, formatter_class=HELP, description=help_text)
        if command == name:
            add(p)
            p.add_argument("--wide", action="store_true", help=f"print every table column (else they fit {TABLE_COLUMNS})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rnq-ep` and `python -m rnq_ep`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None).parse_args(argv)
    except SystemExit as stop:  # --help and usage errors
        return stop.code if isinstance(stop.code, int) else 2
    args.argv = argv
    if getattr(args, "wide", False):
        os.environ[WIDE_ENV] = "1"  # read by report.console / print_table, here and in the processes this one starts
    try:
        return args.run(args)
    except (SpecError, OSError) as err:
        sys.stderr.write(f"rnq-ep {args.command}: error: {err}\n")
        return 2
