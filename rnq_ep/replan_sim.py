"""Online re-planning after a shift of domain, on the cost model (pure): what a deployment with rnq-ep's rebalancer does.

A re-plan policy serves its first scored window on a plan made from the plan-on loads (as a static
policy does), and every later window on `rnq_ep.rebalance.replan.replan` of the plan before it, made
from the previous scored window's counts: the runtime's rebalancer plans from the counts its
recorder saw, keeps copies in place and moves a layer only if the step-time gain over the interval
pays for the moves (and is at least MIN_GAIN). One scored window is one step's tokens, fewer than a
real rebalance window (more sampling noise): conservative. Optimistic: a moved layer serves its new
plan from the window after the re-plan (the runtime serves the old plan while copies are staged), and
the re-plan's own wall time is not charged (the runtime plans in a background thread).

The moves are charged honestly: each moved layer's link time (the rebalancer's own cost: peer
copies over NVLink or the NIC, checkpoint reloads at the inter-node link) is added to that layer's
step time divided by `interval`, the steps a plan serves between two re-plans; the runtime's
horizon defaults to its interval (`--rebalance-horizon 0`), so the moves must pay for themselves
over the same steps they are amortised over. PolicyRun also carries the unamortised figures per
re-plan: layers moved, bytes and link seconds.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from rnq_ep.metrics import layer_tables
from rnq_ep.policies import LEAST_LOADED, Policy, PolicyRun, Served, Windows, plan_placement, score
from rnq_ep.rebalance.replan import Planner, replan, window_loads
from rnq_ep.specs import FORMATS, ClusterSpec, ModelSpec, Plan, SpecError

# Steps between two re-plans: the README's `rnq-ep run --rebalance-interval 10` (the runtime has no interval by
# default: rebalancing is off); its horizon defaults to the interval, so both are this number here.
DEFAULT_REPLAN_INTERVAL = 10
REPLAN_POLICIES = (
    Policy("R&Q bf16+int8+int4 + re-plan", "rnq", LEAST_LOADED, formats=FORMATS),
    Policy("EPLB +12.5 % mem, least-loaded + re-plan", "eplb", LEAST_LOADED, extra_memory=0.125),
)


def window_planner(policy: Policy) -> Planner:
    """The policy's placement as replan's planner: (current plan, window counts [L, E]) -> fresh plan, same layer ids."""

    def plan_window(plan: Plan, counts: np.ndarray) -> Plan:
        """A fresh plan of `policy`'s placement on counts [L, E]."""
        return plan_placement(policy, plan.model, plan.cluster, window_loads(plan, counts))

    return plan_window


def run_replanning(
    policy: Policy, model: ModelSpec, cluster: ClusterSpec, windows: Windows, tokens_per_gpu: int,
    interval: int = DEFAULT_REPLAN_INTERVAL,
) -> PolicyRun:
    """Plan the first window on its plan-on loads, re-plan each later one from the previous scored window's counts."""
    if interval < 1:
        raise ValueError(f"re-plan interval must be >= 1 step, got {interval}")
    scored = [score_on for _, score_on in windows]
    start = time.perf_counter()
    try:
        plan = plan_placement(policy, model, cluster, windows[0][0])
    except SpecError as err:
        return PolicyRun(policy.name, cluster.num_gpus, error=str(err))
    served = [Served(layer_tables(plan), time.perf_counter() - start)]
    migrations = []  # per re-plan: (layers moved, bytes, link seconds)
    planner = window_planner(policy)
    for seen in scored[:-1]:
        start = time.perf_counter()
        try:
            result = replan(plan, np.asarray(seen.counts), interval, tokens_per_gpu, planner)
        except SpecError as err:
            return PolicyRun(policy.name, cluster.num_gpus, error=f"re-plan: {err}")
        plan = result.plan
        moved = [d for d in result.decisions if d.move]
        charged = tuple(d.cost_s / interval if d.move else 0.0 for d in result.decisions)
        served.append(Served(layer_tables(plan), time.perf_counter() - start, charged))
        migrations.append((len(moved), sum(d.bytes_moved for d in moved), sum(d.cost_s for d in moved)))
    run = score(policy, model, cluster, served, scored, tokens_per_gpu)
    if not migrations:
        return run
    layers, moved_bytes, seconds = np.mean(migrations, axis=0).tolist()
    return dataclasses.replace(run, replans=len(migrations), replan_layers=layers, replan_bytes=moved_bytes,
                               replan_s=seconds)
