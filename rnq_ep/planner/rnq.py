"""The R&Q planner: per layer, place one copy of each expert, then replicate (and quantize) to balance."""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from rnq_ep.memory import gpu_budget
from rnq_ep.planner.affinity import align_to_previous, share_matrix
from rnq_ep.planner.hedge import hedge_copies, hedge_layers
from rnq_ep.planner.initial import first_fitting_counts, initial_copies
from rnq_ep.planner.layout import InfeasiblePlan, format_bytes, layer_plan
from rnq_ep.planner.limits import Limits
from rnq_ep.planner.place import copy_counts, replica_order
from rnq_ep.planner.refine import refine_layer
from rnq_ep.planner.quantize import sensitivity_costs
from rnq_ep.planner.singles import even_singles
from rnq_ep.planner.routed import drop_until_within, routed_quantized, routed_quantized_layers, table_of
from rnq_ep.planner.replicate import LayerCopies, spread_load
from rnq_ep.planner.transport import Copies, transport_layers, transport_spread
from rnq_ep.specs import FORMATS, ClusterSpec, LoadStats, ModelSpec, Plan, PlanOptions, SpecError

log = logging.getLogger(__name__)

# Replicas beyond what balancing the planning loads needs make least-loaded routing robust to
# shifts in the loads; we start from the most of these that fit and let spread_load finish.
EXTRA_REPLICAS_PER_GPU = (2.0, 1.0, 0.5, 0.25, 0.125)  # tried in this order, then none
SPREAD_RESERVE = 0.2  # share of the quality budget the initial replicas leave to spread_load
NEAR_FLOOR = 0.02  # fewer replicas are not tried once the max load is within 2 % of a lower bound
EVEN_SLACK = 0.005  # evening the singles may raise the planned max GPU load by this fraction (docs/planner.md step 6b)
NODE_LOCAL_RATIO = 4.0  # prefer same-node copies when intra-node links are this many times faster
REPLANS = 2  # re-plans of a layer whose routed quantized tokens exceed the quality budget


def plan_rnq(model: ModelSpec, cluster: ClusterSpec, loads: LoadStats, options: PlanOptions) -> Plan:
    """Replicate-and-Quantize plan: one LayerPlan per row of loads.counts, in the load file's order."""
    if loads.num_experts != model.num_experts:
        raise SpecError(f"loads: num_experts={loads.num_experts} but model {model.name!r} has {model.num_experts}")
    align = options.affinity_weight > 0 and loads.coactivation is not None
    if options.affinity_weight > 0 and not align:
        log.warning("affinity_weight=%s but the loads have no coactivation stats: ignored", options.affinity_weight)
    started = time.perf_counter()
    budget = gpu_budget(model, cluster, options)
    fmt_bytes = format_bytes(model)
    check_memory_fits(model, cluster, options, budget, fmt_bytes)
    num_gpus = cluster.num_gpus
    prefer_node = cluster.nodes > 1 and cluster.intra_node_bytes_per_s >= NODE_LOCAL_RATIO * cluster.inter_node_bytes_per_s
    limits_of, same_costs = [], None  # without per-layer sensitivities every layer has the same costs
    weights = np.asarray(loads.counts, dtype=np.float64)  # [L, E]
    for index, weight in enumerate(weights):
        token_budget = options.quality_budget * float(weight.sum())
        limits = same_costs.with_token_budget(token_budget) if same_costs is not None else Limits(
            budget=budget,
            fmt_bytes=fmt_bytes,
            cost=sensitivity_costs(loads, index, options),
            token_budget=token_budget,
            max_copies=min(num_gpus, options.max_copies or num_gpus),
            max_held=int(budget // min(fmt_bytes[FORMATS.index(f)] for f in options.formats)),
            gpus_per_node=cluster.gpus_per_node,
            prefer_node=prefer_node,
        )
        if loads.sensitivity is None and loads.importance is None:
            same_costs = limits  # its cached Python views of the costs carry over
        limits_of.append(limits)
    starts, reuses = first_stage(weights, num_gpus, limits_of)
    firsts = [
        (*planned_copies(weight, num_gpus, limits, layer, options, start, False, reuse, fitted), reuse)
        for weight, limits, layer, (start, fitted), reuse in zip(weights, limits_of, loads.layers, starts, reuses)
    ]
    if options.hedge:  # all layers' room costs at once; a re-plan hedges its layer in `plan_layer`
        hedged = hedge_layers([copies for copies, _, _ in firsts], limits_of, num_gpus)
        firsts = [(copies, chosen, reuse) for copies, (_, chosen, reuse) in zip(hedged, firsts)]
    counts = [np.rint(np.asarray(row, dtype=np.float64)).astype(np.int64) for row in loads.counts]
    routed = routed_quantized_layers(
        [table_of(copies, num_gpus, model.num_experts) for copies, _, _ in firsts], counts, [lim.token_budget for lim in limits_of]
    )
    layers = []
    for index, (layer, weight) in enumerate(zip(loads.layers, weights)):
        gpu, expert, fmt, tokens = plan_layer(weight, num_gpus, limits_of[index], layer, options, (*firsts[index], routed[index]))
        share = shares(expert, tokens, weight.size)
        if align:
            current = share_matrix(gpu, expert, share, num_gpus, weight.size)
            if index:
                gpu = align_to_previous(previous, current, np.asarray(loads.coactivation[index - 1], np.float64))[gpu]
            previous = share_matrix(gpu, expert, share, num_gpus, weight.size)
        layers.append(layer_plan(layer, gpu, expert, fmt, share))
    summary = {"planner_seconds": time.perf_counter() - started}
    return Plan(model=model, cluster=cluster, options=options, layers=layers, summary=summary)


def first_stage(weights: np.ndarray, num_gpus: int, limits_of: list[Limits]) -> tuple[list[tuple[int, Copies | None]], list[dict]]:
    """Steps 1-4 of every layer's first plan at once for weights [L, E]: per layer (the first replica count
    to try, its initial copies when they fit; `initial.first_fitting_counts`) and its `reuse` of
    `balanced_copies`, with the replica ranking, the packings made and the transport pass of that count."""
    candidates = replica_counts(weights.shape[1], num_gpus, limits_of[0])  # max_held is the same in every layer
    reuses = [{"ranked": replica_order(weight, candidates[0], limits.max_copies)} for weight, limits in zip(weights, limits_of)]
    rankings = [reuse["ranked"] for reuse in reuses]
    starts = first_fitting_counts(weights, rankings, num_gpus, limits_of, [replica_limits(lim) for lim in limits_of], candidates, reuses)
    fit = [index for index, (_, copies) in enumerate(starts) if copies is not None]
    moved = transport_layers([starts[i][1] for i in fit], [limits_of[i] for i in fit], num_gpus, weights.shape[1])
    for index, result in zip(fit, moved):
        reuses[index]["moved", starts[index][0]] = result
    return starts, reuses


def planned_copies(
    weight: np.ndarray,
    num_gpus: int,
    planning: Limits,
    layer: int,
    options: PlanOptions,
    most: int,
    replan: bool,
    reuse: dict,
    fitted: Copies | None = None,
) -> tuple[Copies, int]:
    """(Copies (gpu, expert, fmt, tokens) [S] of `balanced_copies`, refined when asked, with the singles evened
    out when options.hedge (the callers add the hedge copies); their initial replica count)."""
    state, chosen = balanced_copies(weight, num_gpus, planning, layer, most, replan, reuse, fitted)
    copies = (np.array(state.gpu), np.array(state.expert), np.array(state.fmt), np.array(state.tokens))
    if options.refine:
        copies = refine_layer(copies, weight, planning, num_gpus, options.refine_time_limit)
    if options.hedge:
        if not options.refine:  # refine keeps its exact max load
            copies = even_singles(copies, weight.size, num_gpus, EVEN_SLACK)
    return copies, chosen


def plan_layer(
    weight: np.ndarray, num_gpus: int, limits: Limits, layer: int, options: PlanOptions, first: tuple[Copies, int, dict, float]
) -> Copies:
    """Copies (gpu, expert, fmt, tokens) [S] of one layer whose least-loaded routing of weight [E] keeps
    the quality budget, from its first plan `first` (copies, replica count, reuse, routed quantized tokens):
    a layer over it is re-planned with the tokens it spent scaled down by the overshoot (REPLANS times),
    then quantized copies are dropped (`routed.py`)."""
    counts = np.rint(weight).astype(np.int64)
    copies, chosen, reuse, routed = first
    planning = limits
    for _ in range(REPLANS):
        if routed <= limits.token_budget:
            return copies
        planned = float(copies[3][copies[2] > 0].sum())  # what the plan spent, at most its budget
        planning = planning.with_token_budget(min(planning.token_budget, planned) * limits.token_budget / routed)
        try:
            copies, chosen = planned_copies(weight, num_gpus, planning, layer, options, chosen, True, reuse)
        except InfeasiblePlan:
            break
        if options.hedge:
            copies = hedge_copies(copies, planning, num_gpus)
        routed, _ = routed_quantized(table_of(copies, num_gpus, weight.size), counts, limits.token_budget)
    if routed <= limits.token_budget:
        return copies
    return drop_until_within(copies, counts, limits.token_budget, num_gpus)


def check_memory_fits(
    model: ModelSpec, cluster: ClusterSpec, options: PlanOptions, budget: int, fmt_bytes: np.ndarray
) -> None:
    """Raise InfeasiblePlan if one copy of every expert cannot fit even in the smallest allowed format."""
    num_gpus = cluster.num_gpus
    smallest = min(options.formats, key=lambda f: int(fmt_bytes[FORMATS.index(f)]))
    smallest_bytes = int(fmt_bytes[FORMATS.index(smallest)])
    most = math.ceil(model.num_experts / num_gpus)
    missing = most * smallest_bytes - budget
    if missing > 0:
        crowded = model.num_experts - (most - 1) * num_gpus  # GPUs that must hold `most` experts
        raise InfeasiblePlan(
            f"GPUs 0..{crowded - 1} of {num_gpus} must each hold {most} experts of {model.name!r}: "
            f"{most * smallest_bytes} bytes even with every copy in {smallest} (allowed: {list(options.formats)}), "
            f"but the budget is {budget} bytes per GPU; each of these GPUs misses {missing} bytes"
        )


def balanced_copies(
    weight: np.ndarray, num_gpus: int, limits: Limits, layer: int, most: int, replan: bool, reuse: dict, fitted: Copies | None = None
) -> tuple[LayerCopies, int]:
    """(Copies, their initial replica count): initial replicas (`replica_counts` up to `most`, most first)
    spread to balance; the first that reaches the mean load wins, else fewer replicas are tried while
    that lowers the max GPU load and the best plan so far is more than NEAR_FLOOR above `load_floor`
    (fewer replicas could gain little there, and the replicas are what keeps least-loaded routing
    balanced when the loads shift). A first plan's `most` is its first count whose initial copies fit
    (`initial.first_fitting_counts`); a re-plan's the count that won the last plan (made with a few %
    more quality budget), and it takes the first count from there down that fits. `reuse` holds the
    layer's replica ranking ("ranked", `place.replica_order` for the largest count) and keeps the
    budget-independent work (packing, transport) of each count for the layer's re-plans. `fitted`: the
    initial copies of `most`, when known to fit (the first plans')."""
    floor = load_floor(weight, num_gpus, limits) * (1 + NEAR_FLOOR)
    leave_room = replica_limits(limits)
    best, chosen = None, 0
    for extra in [c for c in replica_counts(weight.size, num_gpus, limits) if c <= most]:
        counts = 1 + np.bincount(reuse["ranked"][:extra], minlength=weight.size)  # = copy_counts(weight, extra, ...)
        try:
            copies = fitted if fitted is not None and extra == most else initial_copies(
                weight, counts, num_gpus, leave_room if extra else limits, layer, reuse
            )
        except InfeasiblePlan:
            if extra:
                continue
            raise
        if ("moved", extra) not in reuse:
            reuse["moved", extra] = transport_spread(copies, limits, num_gpus, weight.size)
        moved, quantized = reuse["moved", extra]
        copies = copies if quantized > limits.token_budget else moved
        state = layer_state(copies, limits, num_gpus, weight.size)
        spread_load(state, limits, give_up_at=np.inf if best is None else best.load.max())
        if best is not None and state.load.max() >= best.load.max():
            break  # fewer replicas stopped helping
        best, chosen = state, extra
        if state.load.max() <= floor or replan:
            break
    return best, chosen


def replica_counts(num_experts: int, num_gpus: int, limits: Limits) -> list[int]:
    """Initial replica counts to try, descending: EXTRA_REPLICAS_PER_GPU, at most what fills every GPU in
    the smallest format, and 0."""
    room = limits.max_held * num_gpus - num_experts
    return sorted({min(room, int(f * num_gpus)) for f in EXTRA_REPLICAS_PER_GPU} | {0}, reverse=True)


def replica_limits(limits: Limits) -> Limits:
    """The limits of a trial with replicas: SPREAD_RESERVE of the quality budget is left to the spread."""
    return limits.with_token_budget(limits.token_budget * (1.0 - SPREAD_RESERVE))


def load_floor(weight: np.ndarray, num_gpus: int, limits: Limits) -> float:
    """Lower bound on any plan's max GPU load for loads [E]: the mean, and with room for one copy per
    GPU, the smallest max load per copy over copy counts that fit (EPLB's rule reaches it)."""
    floor = float(weight.sum()) / num_gpus
    if limits.max_held == 1:
        counts = copy_counts(weight, num_gpus - weight.size, limits.max_copies)
        floor = max(floor, float((weight / counts).max()))
    return floor


def layer_state(copies: Copies, limits: Limits, num_gpus: int, num_experts: int) -> LayerCopies:
    """Mutable planning state of copies (gpu, expert, fmt, tokens) [S]."""
    gpu, expert, fmt, tokens = copies
    copies_of = np.bincount(expert, minlength=num_experts)
    held = np.bincount(gpu, minlength=num_gpus)
    by_expert = gpu[np.lexsort((gpu, expert))].tolist()  # GPUs of expert 0 ascending, then expert 1, ...
    bounds = [0, *np.cumsum(copies_of).tolist()]
    on_gpu = np.lexsort((expert, gpu)).tolist()
    gpu_bounds = [0, *np.cumsum(held).tolist()]
    return LayerCopies(
        gpu=gpu.tolist(),
        expert=expert.tolist(),
        fmt=fmt.tolist(),
        tokens=tokens.tolist(),
        gpus_of={e: by_expert[bounds[e] : bounds[e + 1]] for e in np.flatnonzero(copies_of > 1).tolist()},
        slots_by_gpu=[on_gpu[lo:hi] for lo, hi in zip(gpu_bounds[:-1], gpu_bounds[1:])],
        copies=copies_of.tolist(),
        load=np.bincount(gpu, weights=tokens, minlength=num_gpus),
        used=np.bincount(gpu, weights=limits.fmt_bytes[fmt], minlength=num_gpus).astype(np.int64).tolist(),
        held=held.tolist(),
        quantized_tokens=float(tokens[fmt > 0].sum()),
    )


def shares(expert: np.ndarray, tokens: np.ndarray, num_experts: int) -> np.ndarray:
    """Each copy's fraction of its expert's planned tokens [S]; an expert without tokens splits evenly."""
    total = np.bincount(expert, weights=tokens, minlength=num_experts)
    count = np.bincount(expert, minlength=num_experts)
    return np.where(total[expert] > 0, tokens / np.maximum(total[expert], 1e-300), 1.0 / count[expert])
