"""The placement + routing policies users pick between, and their evaluation on windows of loads (pure).

Every policy is a placement planned on one window of loads (SlotTables per layer, bf16 budget as
plain EP unless it says otherwise) and a rule that splits each step's counts over the copies:
- `hash`: each expert's tokens split evenly over its copies, whatever their load (vLLM picks a
  copy by token index mod copies, which gives this split in aggregate): share_quotas on equal shares.
- `least-loaded`: water_fill, the exact least-loaded split (rnq-ep's router).
- `llep`: plain EP placement, then `llep_spill` per step (LLEP, Nguyen et al. 2026: lambda 1.3,
  alpha 1.0, chunks of m = 1024 tokens, weights travel with the spilled tokens).
- `rnq-spill`: R&Q placement and least-loaded routing, then LLEP's spill rule on what is still
  over lambda, with the spilled copies sent as int8 or int4 (a half or a quarter of LLEP's bf16
  bytes; the sender quantizes a bf16 copy, a quantized copy travels as stored).
The runtime runs LLEP and `rnq-spill` too (`rnq_ep.spill.SpillMoE`, the same `llep_spill` per step).
`run_policy` plans on one window and `score`s the next with the cost model: per layer the step
time of the slowest GPU (FLOP or HBM time, all-to-all) plus weight moves, not overlapped with
compute (LLEP's per step; `rnq_ep.replan_sim`'s re-plans, amortised over their interval).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from rnq_ep.balance import SlotTable, gpu_loads, share_quotas, water_fill
from rnq_ep.costmodel import predict_layer_time, scale_counts, weight_move_time
from rnq_ep.metrics import balancedness, gpu_bytes, layer_tables, quantized_fraction
from rnq_ep.planner import plan_eplb, plan_plain_ep, plan_rnq
from rnq_ep.specs import FORMATS, ClusterSpec, LoadStats, ModelSpec, Plan, PlanOptions, SpecError
from rnq_ep.synthetic import ZipfLoads, window_stats, zipf_windows

HASH, LEAST_LOADED, LLEP, RNQ_SPILL = "hash", "least-loaded", "llep", "rnq-spill"
BF16 = FORMATS.index("bf16")
LLEP_THRESHOLD = 1.3  # lambda: spill only when max/mean GPU load exceeds it
LLEP_CAPACITY = 1.0  # alpha: overloaded GPUs shed down to alpha * mean load
LLEP_MIN_CHUNK = 1024  # m: no spill moves fewer tokens than this (a smaller GEMM is not worth the weights)
Windows = list[tuple[LoadStats, LoadStats]]  # (plan on, score on) pairs


@dataclass(frozen=True)
class Policy:
    """A placement ('plain', 'eplb', 'rnq') with its extra memory or formats, and a routing rule."""

    name: str
    placement: str
    routing: str
    extra_memory: float = 0.0  # EPLB: fraction of bytes above plain EP
    formats: tuple[str, ...] = ("bf16",)  # R&Q: allowed weight formats
    spill_fmt: str = "bf16"  # rnq-spill: the format spilled copies are sent in


PLAIN_EP = Policy("plain EP", "plain", HASH)
POLICIES = (
    PLAIN_EP,
    Policy("EPLB +12.5 % mem, hash", "eplb", HASH, extra_memory=0.125),
    Policy("EPLB +25 % mem, hash", "eplb", HASH, extra_memory=0.25),
    Policy("EPLB +12.5 % mem, least-loaded", "eplb", LEAST_LOADED, extra_memory=0.125),
    Policy("EPLB +25 % mem, least-loaded", "eplb", LEAST_LOADED, extra_memory=0.25),
    Policy("LLEP spill", "plain", LLEP),
    Policy("R&Q bf16+int8", "rnq", LEAST_LOADED, formats=("bf16", "int8")),
    Policy("R&Q bf16+int8+int4", "rnq", LEAST_LOADED, formats=("bf16", "int8", "int4")),
    *(Policy(f"R&Q + {fmt} spill", "rnq", RNQ_SPILL, formats=("bf16", "int8", "int4"), spill_fmt=fmt)
      for fmt in ("int8", "int4")),
)


@dataclass(frozen=True)
class Step:
    """One layer's routed step: the copies that served it and their (token, expert) assignments."""

    table: SlotTable  # the placement, plus the bf16 copies LLEP spilled onto other GPUs
    quotas: np.ndarray  # [S] assignments per copy; per expert they sum to its count
    moves: tuple[tuple[int, int, str], ...] = ()  # weight copies (src gpu, dst gpu, fmt) this step


def place(policy: Policy, model: ModelSpec, cluster: ClusterSpec, loads: LoadStats) -> list[SlotTable]:
    """The policy's placement planned on `loads`: one SlotTable per layer (budget: the cluster's)."""
    if policy.placement == "plain":
        return plain_ep_tables(model, cluster, len(loads.counts))
    return layer_tables(plan_placement(policy, model, cluster, loads))


def plan_placement(policy: Policy, model: ModelSpec, cluster: ClusterSpec, loads: LoadStats) -> Plan:
    """The Plan of an 'eplb' or 'rnq' placement on `loads` (what a re-plan starts from and replaces)."""
    if policy.placement == "eplb":
        return plan_eplb(model, cluster, loads, extra_memory=policy.extra_memory)
    if policy.placement == "rnq":
        return plan_rnq(model, cluster, loads, PlanOptions(formats=policy.formats))
    raise ValueError(f"policy {policy.name!r}: unknown placement {policy.placement!r}, expected plain, eplb or rnq")


def plain_ep_tables(model: ModelSpec, cluster: ClusterSpec, num_layers: int) -> list[SlotTable]:
    """Plain EP per layer; with more GPUs than experts, GPU g holds expert g mod E (data-parallel EP groups)."""
    g, e = cluster.num_gpus, model.num_experts
    if g <= e:
        stub = LoadStats(counts=[[0] * e] * num_layers, num_experts=e, top_k=model.top_k)
        return layer_tables(plan_plain_ep(model, cluster, stub))
    expert = np.arange(g, dtype=np.int64) % e
    share = 1.0 / np.bincount(expert, minlength=e)[expert]
    table = SlotTable.from_arrays(np.arange(g), expert, np.zeros(g, np.int8), share, g, e)
    return [table] * num_layers


def route(policy: Policy, table: SlotTable, counts: np.ndarray) -> Step:
    """Split one step's counts [E] over the table's copies by the policy's rule."""
    if policy.routing == HASH:
        return Step(table, share_quotas(table, counts))
    if policy.routing == LEAST_LOADED:
        return Step(table, water_fill(table, counts))
    if policy.routing == LLEP:
        return llep_spill(table, counts)
    if policy.routing == RNQ_SPILL:
        return llep_spill(table, counts, start=water_fill(table, counts), spill_fmt=policy.spill_fmt)
    raise ValueError(
        f"policy {policy.name!r}: unknown routing {policy.routing!r}, expected hash, least-loaded, llep or rnq-spill"
    )


def llep_spill(
    table: SlotTable,
    counts: np.ndarray,
    threshold: float = LLEP_THRESHOLD,
    capacity: float = LLEP_CAPACITY,
    min_chunk: int = LLEP_MIN_CHUNK,
    start: np.ndarray | None = None,
    spill_fmt: str = "bf16",
) -> Step:
    """LLEP's least-loaded spilling of one step: counts [E] -> Step with the spilled copies and weight moves.

    The rule, exactly:
    1. Start from `start` [S] (default: the even split over the placement's copies; plain EP: each
       expert whole on its GPU).
    2. If max/mean GPU load <= `threshold`, nothing moves.
    3. Else cap = ceil(capacity * mean). GPUs above cap, heaviest first, each shed load - cap:
       repeatedly take the GPU's copy with the most tokens (ties: lowest slot), the least-loaded GPU
       (ties: lowest index) as receiver, and move min(excess, the copy's tokens, cap - receiver
       load) tokens; stop this GPU when that amount is below `min_chunk`.
    4. The receiver serves them with a copy of the expert: its existing copy if it holds one, else
       a new slot, which costs one weight move (src gpu, dst gpu, fmt) this step: fmt is `spill_fmt`
       when the source copy is bf16, else the source's own (int8 cannot become bf16, and int8 re-quantized
       to int4 would round twice).
    """
    quotas = share_quotas(table, counts) if start is None else np.asarray(start, dtype=np.int64)
    load = gpu_loads(table, quotas)
    mean = float(load.mean())
    if mean == 0 or load.max() <= threshold * mean:
        return Step(table, quotas)
    cap = math.ceil(capacity * mean)
    gpu, expert, fmt, share = list(table.gpu), list(table.expert), list(table.fmt), list(table.share)
    tokens = quotas.tolist()
    slot_of = {(int(g), int(e)): s for s, (g, e) in enumerate(zip(gpu, expert))}
    moves = []
    local_slots = [np.flatnonzero(table.gpu == g).tolist() for g in range(table.num_gpus)]  # senders never receive
    for src in np.argsort(-load, kind="stable"):
        local = local_slots[src]
        while load[src] - cap >= min_chunk:
            slot = max(local, key=lambda s: (tokens[s], -s))
            dst = int(np.argmin(load))
            amount = int(min(load[src] - cap, tokens[slot], cap - load[dst]))
            if amount < min_chunk:
                break
            key = (dst, expert[slot])
            if key not in slot_of:
                slot_of[key] = len(gpu)
                code = FORMATS.index(spill_fmt) if fmt[slot] == BF16 else fmt[slot]
                new = ((gpu, dst), (expert, expert[slot]), (fmt, code), (share, 0.0), (tokens, 0))
                for column, value in new:
                    column.append(value)
                moves.append((int(src), dst, FORMATS[code]))
            tokens[slot] -= amount
            tokens[slot_of[key]] += amount
            load[src] -= amount
            load[dst] += amount
    spilled = SlotTable.from_arrays(np.array(gpu), np.array(expert), np.array(fmt, np.int8), np.array(share),
                                    table.num_gpus, table.num_experts)
    return Step(spilled, np.array(tokens, dtype=np.int64), tuple(moves))


@dataclass(frozen=True)
class PolicyRun:
    """One policy at one GPU count; times are seconds per layer, averaged over layers and windows."""

    policy: str
    num_gpus: int
    layer_s: float = float("nan")  # slowest GPU's compute + all-to-all, + weight moves
    flop_s: float = float("nan")  # parts on the slowest GPU
    hbm_s: float = float("nan")
    comm_s: float = float("nan")
    move_s: float = float("nan")  # LLEP's per-step moves, or a re-plan's amortised over its interval
    balancedness: float = float("nan")  # median over layers and windows of max/mean GPU load
    quantized_fraction: float = float("nan")  # mean over layers and windows
    max_bytes_per_gpu: int = 0  # largest over layers and GPUs, LLEP's spilled copies included
    planner_s: float = 0.0  # per plan (one window, all layers)
    simulation_s: float = 0.0  # per window, all layers
    gpu_loads: np.ndarray | None = None  # [L, G] tokens per GPU in the last scored window
    error: str = ""
    replans: int = 0  # re-plan policies: re-plans made; the means below are per re-plan, all layers, unamortised
    replan_layers: float = 0.0  # layers moved
    replan_bytes: float = 0.0  # bytes sent or reloaded
    replan_s: float = 0.0  # link time of the moves, layer after layer (cost model)


@dataclass(frozen=True)
class Served:
    """The placement that serves one scored window, the planner seconds it took, and per layer [L] the seconds of
    weight moves charged to each step (a re-plan's moves amortised over its interval; () for none)."""

    tables: list[SlotTable]
    planner_s: float
    move_s: tuple[float, ...] = ()


Placements = dict[tuple, tuple[list[SlotTable] | SpecError, float]]  # (placement key, window) -> (tables or error, s)


def run_policy(
    policy: Policy, model: ModelSpec, cluster: ClusterSpec, windows: Windows, tokens_per_gpu: int,
    placements: Placements | None = None,
) -> PolicyRun:
    """Plan on each window's first loads, route and time the second: the policy's averaged PolicyRun.

    Windows that plan on the same LoadStats object share one plan. `placements`: plans already made for these
    windows, shared by policies that place alike (R&Q + spill plans as R&Q does); a reused plan reports the planner
    time it took when it was made.
    """
    placements = {} if placements is None else placements
    served = []
    for plan_on, _ in windows:
        first = next(w for w, (other, _) in enumerate(windows) if other is plan_on)
        key = (policy.placement, policy.extra_memory, policy.formats, first)
        if key not in placements:
            start = time.perf_counter()
            try:
                placed: list[SlotTable] | SpecError = place(policy, model, cluster, plan_on)
            except SpecError as err:
                placed = err
            placements[key] = (placed, time.perf_counter() - start)
        tables, seconds = placements[key]
        if isinstance(tables, SpecError):
            return PolicyRun(policy.name, cluster.num_gpus, error=str(tables))
        served.append(Served(tables, seconds))
    return score(policy, model, cluster, served, [score_on for _, score_on in windows], tokens_per_gpu)


def score(
    policy: Policy, model: ModelSpec, cluster: ClusterSpec, served: list[Served], scored: list[LoadStats],
    tokens_per_gpu: int,
) -> PolicyRun:
    """Route and time each scored window on the placement that serves it: means over layers and windows."""
    g = cluster.num_gpus
    parts, balance, quantized, peak, planner_s, simulation_s = [], [], [], 0, 0.0, 0.0
    for placement, score_on in zip(served, scored, strict=True):
        planner_s += placement.planner_s
        start = time.perf_counter()
        loads = []
        charged = placement.move_s or (0.0,) * len(placement.tables)
        for table, row, replan_s in zip(placement.tables, score_on.counts, charged, strict=True):
            step = route(policy, table, scale_counts(np.asarray(row), model, g, tokens_per_gpu))
            layer = predict_layer_time(model, cluster, step.table, step.quotas)
            slowest = int(np.argmax(layer.compute_s + layer.comm_s))
            move_s = (weight_move_time(model, cluster, list(step.moves)) if step.moves else 0.0) + replan_s
            parts.append((layer.total_s + move_s, layer.flop_s[slowest], layer.hbm_s[slowest], layer.comm_s[slowest], move_s))
            loads.append(np.bincount(step.table.gpu, weights=step.quotas, minlength=g))
            balance.append(balancedness(loads[-1]))
            quantized.append(quantized_fraction(step.table, step.quotas))
            peak = max(peak, int(gpu_bytes(model, step.table).max()))
        simulation_s += time.perf_counter() - start
    layer_s, flop_s, hbm_s, comm_s, move_s = np.mean(parts, axis=0).tolist()
    return PolicyRun(
        policy.name, g, layer_s, flop_s, hbm_s, comm_s, move_s, balancedness=float(np.median(balance)),
        quantized_fraction=float(np.mean(quantized)), max_bytes_per_gpu=peak, planner_s=planner_s / len(served),
        simulation_s=simulation_s / len(served), gpu_loads=np.array(loads),
    )


def synthetic_windows(model: ModelSpec, loads: ZipfLoads, num_layers: int, windows: int, tokens: int, seed: int) -> Windows:
    """Consecutive (plan on, score on) pairs of `windows` seeded Zipf windows of `tokens` tokens each."""
    counts = zipf_windows(loads, num_layers, model.num_experts, model.top_k, windows, tokens, seed)
    stats = [window_stats(c, model.top_k, f"{loads.label}, window {w}") for w, c in enumerate(counts)]
    return list(zip(stats[:-1], stats[1:]))


def run_all(
    model: ModelSpec, cluster: ClusterSpec, windows: Windows, tokens_per_gpu: int, policies: tuple[Policy, ...] = POLICIES
) -> list[PolicyRun]:
    """Every policy at one GPU count, plain EP first (the ratios' baseline); policies that place alike share plans."""
    placements: Placements = {}
    ordered = (PLAIN_EP, *(p for p in policies if p != PLAIN_EP))
    return [run_policy(p, model, cluster, windows, tokens_per_gpu, placements) for p in ordered]


def expert_skew(windows: Windows) -> float:
    """Mean over scored layers of max/mean expert count: how skewed the loads are."""
    counts = np.array([row for _, score_on in windows for row in score_on.counts], dtype=np.float64)
    return float(np.mean(counts.max(axis=1) / counts.mean(axis=1)))


