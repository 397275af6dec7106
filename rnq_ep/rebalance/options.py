"""Command-line flags of online rebalancing, for `rnq-ep run` (the CLI owner wires them in)."""

from __future__ import annotations

import argparse
from typing import Any


def add_rebalance_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --rebalance-interval, --rebalance-window, --rebalance-horizon, --rebalance-copies-per-step, --replan-timeout, --loads-after, --drift-step."""
    group = parser.add_argument_group("online rebalancing")
    group.add_argument("--rebalance-interval", type=int, default=0, help="re-plan every N steps (0: off)")
    group.add_argument("--rebalance-window", type=int, default=0, help="steps of routed counts to plan from (0: the interval)")
    group.add_argument("--rebalance-horizon", type=int, default=0,
                       help="steps a new plan must pay for its moves over (0: the interval)")
    group.add_argument("--rebalance-copies-per-step", type=int, default=4, help="changed copies staged between two steps")
    group.add_argument("--replan-timeout", type=float, default=60.0, help="seconds before a re-plan is abandoned")
    group.add_argument("--loads-after", help="load file the routing switches to at --drift-step (drift scenario)")
    group.add_argument("--drift-step", type=int, default=0, help="first step routed from --loads-after")


def rebalance_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The run_worker keyword arguments of the flags above."""
    return {
        "rebalance_interval": args.rebalance_interval,
        "rebalance_window": args.rebalance_window,
        "rebalance_horizon": args.rebalance_horizon,
        "rebalance_copies_per_step": args.rebalance_copies_per_step,
        "replan_timeout_s": args.replan_timeout,
        "loads_after": args.loads_after,
        "drift_step": args.drift_step,
    }


def rebalance_flags_given(args: argparse.Namespace) -> list[str]:
    """The online-rebalancing flags set away from their defaults, as `--flag` names (for paths that cannot honour them)."""
    defaults = argparse.ArgumentParser()
    add_rebalance_arguments(defaults)
    given = []
    for action in defaults._actions:
        if action.dest != "help" and getattr(args, action.dest, action.default) != action.default:
            given.append(action.option_strings[0])
    return given
