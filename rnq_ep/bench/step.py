"""`rnq-ep bench step`: host work, syncs and aten ops of one layer step's control path, old vs new.

DeepSeek-V3's layer (256 experts, top-8) planned by R&Q for 32 GPUs on synthetic Zipf loads; rank 0
of that plan, every other rank's counts drawn from the same distribution. Collectives are stubbed
by a symmetric peer (each peer sends back what this rank sends), expert compute by the identity,
and rows are MOVE_HIDDEN wide: on a GPU moving 7168-wide rows costs microseconds of HBM time, on
this CPU milliseconds of copies that would hide the control path being measured.
- old: the host routing of the previous runtime (numpy quotas, routes and per-rank copy counts,
  `rnq_ep.routing`), which every step ran before the layout moved to the device; its dispatch
  bookkeeping is not included, so old is a lower bound.
- exact, capacity: `step_layout` + `dispatch` + `combine` (rnq_ep.layout, rnq_ep.dispatch).
On CPU the microseconds include the ops' own work; aten ops stand for kernel launches on a GPU.
quota us: the least-loaded quota op alone, which on CPU runs the host water_fill and on a GPU is
one Triton launch (rnq_ep.kernels.quotas).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch

from rnq_ep.balance import SlotTable
from rnq_ep.bench.syncs import count_syncs
from rnq_ep.layout import capacity_for, local_counts, step_layout
from rnq_ep.quotas import RouteTable, route_table
from rnq_ep.specs import write_atomic

MODEL_NAME = "deepseek-v3"
NUM_GPUS = 32
TOKENS = (1, 64, 1024)
ZIPF = 0.6  # the simulate default's skew
REPEATS = 30
MOVE_HIDDEN = 64  # row width moved in the bench (see the module docstring)


def plan_table(num_gpus: int, seed: int) -> tuple[SlotTable, np.ndarray]:
    """One R&Q-planned DeepSeek-V3 layer for num_gpus GPUs and the expert probabilities it was planned on."""
    import msgspec

    from rnq_ep.bench.planner import scaled_cluster
    from rnq_ep.planner.rnq import plan_rnq
    from rnq_ep.specs import PlanOptions, load_cluster, load_model
    from rnq_ep.synthetic import capped_zipf, window_stats

    model = load_model(MODEL_NAME)
    rng = np.random.default_rng(seed)
    prob = capped_zipf(model.num_experts, ZIPF, 0.5 / model.top_k)[rng.permutation(model.num_experts)]
    counts = rng.multinomial(65536 * model.top_k, prob)[None]
    model = msgspec.structs.replace(model, num_layers=1)
    plan = plan_rnq(model, scaled_cluster(load_cluster("h100x32"), num_gpus), window_stats(counts, model.top_k, "zipf"),
                    PlanOptions(formats=("bf16", "int8", "int4")))
    return SlotTable.from_layer(plan.layers[0], num_gpus, model.num_experts), prob


def step_inputs(prob: np.ndarray, tokens: int, top_k: int, hidden: int, num_gpus: int, seed: int):
    """Rank 0's x [T, H] bf16, topk ids/weights [T, k], and every rank's counts [R, E] (rank 0's first)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(len(prob), top_k, replace=False, p=prob) for _ in range(tokens)])
    others = [rng.multinomial(tokens * top_k, prob) for _ in range(num_gpus - 1)]
    counts = np.stack([np.bincount(ids.reshape(-1), minlength=len(prob)), *others]).astype(np.int64)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))
    weights = torch.softmax(torch.randn(tokens, top_k), -1)
    return x, torch.from_numpy(ids), weights, counts


def old_path(table: SlotTable, ids: torch.Tensor, counts: np.ndarray) -> Callable[[], object]:
    """The previous runtime's host routing of one step: quotas, routes, rank x copy counts (numpy)."""
    from rnq_ep.routing import slot_index, step_quotas, step_rank_copy_counts, step_route

    index = slot_index(table)

    def run() -> object:
        flat = ids.reshape(-1).long()
        local = torch.bincount(flat, minlength=table.num_experts)
        gathered = torch.from_numpy(counts).cpu().numpy()  # the all-gathered counts read on the host
        quotas = step_quotas(gathered, index, "least-loaded")
        slots = step_route(gathered, index, flat, local, 0, "least-loaded", quotas)
        return slots, step_rank_copy_counts(gathered, index, "least-loaded", quotas) @ index.on_gpu

    return run


def decide_path(
    route: RouteTable, ids: torch.Tensor, counts: np.ndarray, transport: str
) -> Callable[[torch.Tensor], object]:
    """Rank 0's decide part of one step (counts, stubbed gather, layout): topk_ids [T, k] -> StepLayout."""
    table = route.table
    others = torch.cat([torch.from_numpy(counts[1:]), torch.zeros(len(counts) - 1, 2, dtype=torch.int64)], 1)
    capacity = capacity_for(ids.shape[0], ids.shape[1], table.num_gpus) if transport == "capacity" else None

    def decide(topk_ids: torch.Tensor) -> object:
        flat, mine, health = local_counts(topk_ids, table.num_experts)
        gathered = torch.cat([torch.cat([mine, health])[None], others])
        return step_layout(topk_ids, flat, gathered, route, transport, capacity)

    return decide


def compiled_decide(decide: Callable[[torch.Tensor], object], ids: torch.Tensor, repeats: int) -> tuple[int, float]:
    """(kernels inductor generates for the decide part, us per compiled call): torch.compile(fullgraph=True)."""
    from torch._inductor import metrics

    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(decide, fullgraph=True, dynamic=False)
    compiled(ids)
    return metrics.generated_kernel_count, best_us(lambda: compiled(ids), repeats)


def new_path(table: SlotTable, x, ids, weights, counts: np.ndarray, transport: str) -> Callable[[], object]:
    """One layer step of rank 0 with stubbed collectives and identity experts: layout, dispatch, combine."""
    from rnq_ep import dispatch as moves

    route = route_table(table, 0, "least-loaded")
    world = table.num_gpus
    decide = decide_path(route, ids, counts, transport)

    def run() -> object:
        layout = decide(ids)
        recv, received = moves.dispatch(x, weights, layout, route.num_local, 0, None, world)
        y = recv * received.weights[:, None].to(recv.dtype)
        return moves.combine(y, layout, received, x.shape[0], x.dtype, None, world)

    return run


def measure(run: Callable[[], object], repeats: int) -> tuple[float, int, int, int]:
    """(host us per call, best of `repeats` after a warm-up; syncs; aten ops; those that launch kernels)."""
    with mock.patch("rnq_ep.dispatch.fc.all_to_all_single", side_effect=lambda t, *a, **k: t):
        run()
        count = count_syncs(run)
        return best_us(run, repeats), count.total, count.num_ops, count.launches


def best_us(run: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up call, in microseconds."""
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def rows(tokens: tuple[int, ...], repeats: int, seed: int, compiled: bool = False) -> list[dict]:
    """Every (tokens per rank, path) row of the bench."""
    from rnq_ep.specs import load_model

    from rnq_ep.quotas import policy_quotas

    model = load_model(MODEL_NAME)
    table, prob = plan_table(NUM_GPUS, seed)
    route = route_table(table, 0, "least-loaded")
    out = []
    for t in tokens:
        x, ids, weights, counts = step_inputs(prob, t, model.top_k, MOVE_HIDDEN, NUM_GPUS, seed + t)
        total = torch.from_numpy(counts.sum(0))
        quota_us = round(best_us(lambda: policy_quotas(total, route), repeats), 1)
        paths = {"old": old_path(table, ids, counts)}
        for transport in ("exact", "capacity"):
            paths[transport] = new_path(table, x, ids, weights, counts, transport)
        for name, run in paths.items():
            us, syncs, ops, launches = measure(run, repeats)
            row = {"tokens_per_rank": t, "path": name, "host_us_per_layer": round(us, 1),
                   "syncs_per_layer": syncs, "aten_ops_per_layer": ops, "launches_per_layer": launches,
                   "quota_us": None if name == "old" else quota_us}
            if compiled and name != "old":
                kernels, decide_us = compiled_decide(decide_path(route, ids, counts, name), ids, repeats)
                row.update(compiled_decide_kernels=kernels, compiled_decide_us=round(decide_us, 1))
            out.append(row)
            print(f"  {t:>5} tokens/rank  {name:<9} {us:>9.1f} us  {syncs:>3} syncs  {ops:>4} aten ops", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the old / exact / capacity control path per layer step; --json writes the rows."""
    parser = argparse.ArgumentParser(prog="rnq-ep bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens per rank, comma separated")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed calls per row (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write {'rows': [...]} here")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown here (for BENCHMARKS.md)")
    parser.add_argument("--compiled", action="store_true",
                        help="also torch.compile the decide part of each new path (~30 s a row): inductor's kernel count")
    args = parser.parse_args(argv)
    try:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    except ValueError:
        parser.error(f"--tokens: expected comma-separated integers, got {args.tokens!r}")
    if not tokens or min(tokens) < 1 or max(tokens) > 65536:
        parser.error(f"--tokens: each must be in [1, 65536], got {args.tokens!r}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)
    print(f"bench step: {MODEL_NAME} R&Q plan for {NUM_GPUS} GPUs, rank 0, collectives stubbed, "
          f"best of {args.repeats}", file=sys.stderr)
    result = rows(tokens, args.repeats, args.seed, args.compiled)
    header = ("tokens/rank", "path", "host us/layer", "old / this", "syncs", "aten ops", "launches", "quota us",
              "rest us", *(("compiled decide kernels", "compiled decide us") if args.compiled else ()))
    lines = [header]
    for row in result:
        old = next(r for r in result if r["tokens_per_rank"] == row["tokens_per_rank"] and r["path"] == "old")
        quota = row["quota_us"]
        lines.append((str(row["tokens_per_rank"]), row["path"], f"{row['host_us_per_layer']:.1f}",
                      f"{old['host_us_per_layer'] / row['host_us_per_layer']:.2f}x", str(row["syncs_per_layer"]),
                      str(row["aten_ops_per_layer"]), str(row["launches_per_layer"]),
                      "" if quota is None else f"{quota:.1f}",
                      "" if quota is None else f"{row['host_us_per_layer'] - quota:.1f}",
                      *((str(row.get("compiled_decide_kernels", "")), str(row.get("compiled_decide_us", "")))
                        if args.compiled else ())))
    for line in lines:
        print(f"{line[0]:>11}  {line[1]:<9} " + " ".join(f"{cell:>13}" for cell in line[2:]))
    if args.json:
        write_atomic(args.json, json.dumps({"rows": result}, indent=1).encode())
    if args.markdown:
        table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        table += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        note = (f"{MODEL_NAME} layer, R&Q plan for {NUM_GPUS} GPUs, rank 0, collectives stubbed, rows "
                f"{MOVE_HIDDEN} wide, best of {args.repeats}, one thread. old: the previous host routing only "
                "(a lower bound on its step). quota us: the least-loaded quota op, on CPU the host water_fill, "
                "on a GPU one Triton launch. launches: aten ops less metadata-only views. compiled decide: the counts, "
                "gather and layout under torch.compile(fullgraph=True): kernels inductor generated (sorts, searchsorted "
                "and the quota op run as extern calls beside them).")
        write_atomic(args.markdown, ("\n".join(table) + "\n\n" + note + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
