"""RunOptions: what one `rnq-ep run` passes to run_worker, built and checked once before any rank starts.

`options_from_args` turns the flags into a RunOptions (its own ranges checked on construction);
`check_inputs` reads the plans and load files and runs the planner's plan check (`specs.check_plan`),
so bad input is refused in one line before `init_process_group` (torchrun) or before any Ray actor starts.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import NamedTuple

import msgspec

from rnq_ep.layout import CAPACITY_MAX_TOKENS, TRANSPORTS
from rnq_ep.rebalance.options import rebalance_kwargs
from rnq_ep.routing import POLICIES
from rnq_ep.runtime.inputs import layer_counts
from rnq_ep.specs import (
    FORMATS, MAX_SEED, LoadStats, ModelSpec, Plan, SpecError, check_plan, check_stats_match_model, load_model, load_plan, load_stats,
)

BACKENDS = ("auto", "triton", "torch")
TRANSPORT_HELP = (f"token dispatch: capacity (fixed-size, sync-free all-to-all) or exact (uneven all-to-all); auto: "
                  f"capacity at small token counts (up to {CAPACITY_MAX_TOKENS} per rank) in compiled or CUDA-graph "
                  "steps, exact otherwise (an eager capacity step reads its overflow flag: no saving)")
MAX_TOKENS = 2**20  # per rank per step: the batch alone is 2**20 x hidden floats
MAX_STEPS = 10**6  # every step's stats stay in memory until the run ends


class RunOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """run_worker's configuration; paths are read on the rank (Ray workers get copies of the driver's plans)."""

    plan: str  # plan JSON path
    interleave: tuple[str, ...] = ()  # more plan paths of the same layers, run on the same batch every step
    model: ModelSpec | str | None = None  # same experts and top_k as the plan's model, other sizes; None: the plan's
    loads: str | None = None  # load JSON whose per-layer counts the routing follows; None: uniform
    loads_after: str | None = None  # load JSON the routing follows from drift_step on (a drift scenario)
    drift_step: int = 0
    tokens: int = 256  # per rank per step
    steps: int = 5
    first_step: int = 0  # steps first_step..steps-1 run (a Ray restart resumes there)
    seed: int = 0  # of weights and batches
    policy: str = "least-loaded"  # routing.POLICIES: copy choice per token
    backend: str = "auto"  # expert kernels: auto | triton | torch
    transport: str = "auto"  # TRANSPORTS
    spill_fmt: str | None = None  # spill per step in this format (SpillMoE); None: no spilling
    keep_outputs: bool = False  # StepStats.output: this rank's last hidden states [T, H]
    timeout_s: float = 300.0  # process-group (collective) timeout, seconds
    rebalance_interval: int = 0  # re-plan online every that many steps; 0: off
    rebalance_window: int = 0  # steps of routed counts a re-plan reads; 0: the interval
    rebalance_horizon: int = 0  # steps a new plan must pay for its moves over; 0: the interval
    rebalance_copies_per_step: int = 4  # changed copies staged between two steps
    replan_timeout_s: float = 60.0  # seconds before a background re-plan is abandoned

    def __post_init__(self) -> None:
        _in_range("--tokens", self.tokens, 1, MAX_TOKENS)
        _in_range("--steps", self.steps, 1, MAX_STEPS)
        _in_range("first_step", self.first_step, 0, self.steps - 1)
        _in_range("--seed", self.seed, 0, MAX_SEED)
        for flag, value, known in (("--policy", self.policy, POLICIES), ("--backend", self.backend, BACKENDS),
                                   ("--transport", self.transport, TRANSPORTS),
                                   ("--spill", self.spill_fmt or FORMATS[0], FORMATS)):
            if value not in known:
                raise SpecError(f"{flag} {value!r}: expected one of {', '.join(known)}")
        for flag, seconds in (("--timeout", self.timeout_s), ("--replan-timeout", self.replan_timeout_s)):
            if not (math.isfinite(seconds) and seconds > 0):
                raise SpecError(f"{flag} {seconds:g}: expected a number of seconds > 0")
        for flag in ("interval", "window", "horizon"):
            _in_range(f"--rebalance-{flag}", getattr(self, f"rebalance_{flag}"), 0, MAX_STEPS)
        _in_range("--rebalance-copies-per-step", self.rebalance_copies_per_step, 1, MAX_STEPS)
        if self.loads_after is None and self.drift_step:
            raise SpecError(f"--drift-step {self.drift_step}: needs --loads-after (the loads it switches to)")
        if self.loads_after is not None:
            _in_range("--drift-step", self.drift_step, 0, self.steps - 1)
        if self.rebalance_interval and (self.interleave or self.spill_fmt):
            raise SpecError("--rebalance-interval: online rebalancing runs one plan and does not spill; got "
                            + ("interleaved plans" if self.interleave else f"--spill {self.spill_fmt}"))


def _in_range(flag: str, value: int, least: int, most: int) -> None:
    """Raise SpecError naming `flag` unless least <= value <= most."""
    if not least <= value <= most:
        raise SpecError(f"{flag} {value}: expected an integer in [{least}, {most}]")


def check_model_or_hf(model: str | None, hf: str | None) -> None:
    """Raise SpecError when both a bare-layers model and a transformers model are given."""
    if model and hf:
        raise SpecError(f"--model {model} and --hf {hf}: give one (--hf runs a transformers model, --model the bare layers)")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """RunOptions of `rnq-ep run`'s flags (checked; the files are read by check_inputs)."""
    check_model_or_hf(args.model, getattr(args, "hf", None))
    rebalance = rebalance_kwargs(args)
    return RunOptions(
        plan=args.plan, model=args.model, loads=args.loads, tokens=args.tokens, steps=args.steps, seed=args.seed,
        policy=args.policy, backend=args.backend, transport=args.transport, spill_fmt=args.spill,
        timeout_s=args.timeout, loads_after=rebalance.pop("loads_after"), drift_step=rebalance.pop("drift_step"),
        **rebalance,
    )


class RunInputs(NamedTuple):
    """What check_inputs read: the plans (options.plan first), the model to build, the load files (None: not given)."""

    plans: list[Plan]
    model: ModelSpec
    loads: LoadStats | None
    loads_after: LoadStats | None


def check_inputs(options: RunOptions, world_size: int | None = None, contents: bool = True) -> RunInputs:
    """Every file `options` names, read and checked against the first plan.

    Every plan has the first plan's layers and GPU count (world_size, if given) and, with `contents`, passes
    specs.check_plan (library callers may run plans no planner makes: bench e2e's EPLB plans over the cluster's
    budget); the model has the plan's experts and top_k; each load file fits the plan's model and layers.
    """
    paths = (options.plan, *options.interleave)
    plans = [load_plan(path) for path in paths]
    plan, gpus = plans[0], world_size or plans[0].cluster.num_gpus
    for path, other in zip(paths, plans):
        if contents:
            check_plan(other, where=path)
        if other.cluster.num_gpus != gpus:
            raise SpecError(f"{path}: the plan has {other.cluster.num_gpus} GPUs but the world size is {gpus}; "
                            f"launch with --nproc-per-node={other.cluster.num_gpus} or plan for {gpus} GPUs")
        if [layer.layer for layer in other.layers] != [layer.layer for layer in plan.layers]:
            raise SpecError(f"{path}: interleaved plans must have the layers of {options.plan}")
    model = resolve_model(plan, options.model)
    for other in plans[1:]:
        resolve_model(other, model)
    return RunInputs(plans, model, read_loads("--loads", options.loads, plan),
                     read_loads("--loads-after", options.loads_after, plan))


def read_loads(flag: str, path: str | None, plan: Plan) -> LoadStats | None:
    """The load file given with `flag` (None: none given), checked against the plan's model and layers."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise SpecError(f"{flag} {path}: no such file")
    stats = load_stats(path)
    check_stats_match_model(stats, plan.model, where=f"{flag} {path}")
    try:
        layer_counts(plan, stats)  # its layer ids, or else its layer count, must match the plan's
    except SpecError as err:
        raise SpecError(f"{flag} {path}: {err}") from None
    return stats


def resolve_model(plan: Plan, model: str | ModelSpec | None) -> ModelSpec:
    """The model to build: the plan's own, or a same-shaped (experts, top_k) model of other sizes."""
    if model is None:
        return plan.model
    spec = load_model(model) if isinstance(model, str) else model
    if (spec.num_experts, spec.top_k) != (plan.model.num_experts, plan.model.top_k):
        raise SpecError(
            f"model {spec.name!r} has {spec.num_experts} experts, top-{spec.top_k}; the plan is for "
            f"{plan.model.name!r} with {plan.model.num_experts} experts, top-{plan.model.top_k}"
        )
    return spec
