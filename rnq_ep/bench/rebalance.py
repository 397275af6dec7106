"""`rnq-ep bench rebalance`: the stall of an online switch, staged layer by layer vs stop-the-world.

CPU gloo part: spawned ranks serve a drifted load on plan A, then move to plan B (R&Q re-planned on
the new load, kept in place). Staged: one layer migrates after each step; stop-the-world: every
layer migrates between two steps. A step during a switch costs its own time plus the migration
after it (on CPU the ranks do both in turn: no side stream); the rounds interleave steady and
switching steps so the host's other load falls on both alike. Bytes moved per step is the
deterministic proxy of the stall.
Cost-model part (`rebalance_cost.py`): DeepSeek-V3 on 64-1024 H200s, the layers the rebalancer would
move, staged (one layer per step) vs all layers at once.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import msgspec
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

from rnq_ep.balance import SlotTable
from rnq_ep.bench.planner import BenchTable, to_markdown
from rnq_ep.bench.rebalance_cost import cost_model_table
from rnq_ep.planner import plan_rnq
from rnq_ep.rebalance.migrate import LayerMigration
from rnq_ep.rebalance.replan import keep_in_place
from rnq_ep.runtime.inputs import checkpoint_loader, make_batch
from rnq_ep.runtime.worker import build_layers, leave_group, run_step
from rnq_ep.specs import ModelSpec, Plan, PlanOptions, load_cluster, load_model
from rnq_ep.synthetic import ZipfLoads, window_stats, zipf_windows

TARGET_RATIO = 1.5  # no step during a switch slower than this times steady state


def drifted_plans(model: ModelSpec, num_ranks: int, seed: int) -> tuple[Plan, Plan, np.ndarray]:
    """(plan on the old load, plan on the new load kept in place, new counts [L, E]) for `num_ranks` CPU workers."""
    cluster = msgspec.structs.replace(load_cluster("cpu4"), name=f"cpu{num_ranks}", gpus_per_node=num_ranks)
    windows = zipf_windows(ZipfLoads(1.2, drift=1.0), model.num_layers, model.num_experts, model.top_k, 2, 4096, seed)
    options = PlanOptions(formats=("bf16", "int8", "int4"))
    old = plan_rnq(model, cluster, window_stats(windows[0], model.top_k, model.name), options)
    new = plan_rnq(model, cluster, window_stats(windows[1], model.top_k, model.name), options)
    layers = [keep_in_place(a, b, model, cluster) for a, b in zip(old.layers, new.layers)]
    return old, msgspec.structs.replace(new, layers=layers), windows[1]


def bench_rank(
    rank: int, world: int, port: int, model: ModelSpec, rounds: int, tokens: int, copies_per_step: int, seed: int, results
) -> None:
    """One spawned rank: `rounds` of (staged switch interleaved with steady steps, then stop-the-world)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        old, new, counts = drifted_plans(model, world, seed)
        group, g, e = dist.group.WORLD, world, model.num_experts
        tables = [SlotTable.from_layer(layer, g, e) for layer in new.layers]
        loaders = [checkpoint_loader(model, index, seed, "cpu") for index in range(len(tables))]
        rows = list(counts.astype(np.float64))
        step = 0

        def timed_step(layers) -> float:
            nonlocal step
            hidden, routing = make_batch(model, rows, tokens, seed, rank, step)
            step += 1
            return run_step(step, layers, hidden, routing, group, False).seconds

        def advance(migration: LayerMigration) -> tuple[float, int, bool]:
            """One staging call, barrier to barrier: (seconds, this rank's bytes in and out, finished)."""
            start = time.perf_counter()
            sent, received = migration.bytes_sent, migration.bytes_received
            moved = migration.advance()
            dist.barrier(group)
            if moved is not None and not moved.switched:
                raise RuntimeError(f"layer {moved.layer}: a benchmark migration did not switch")
            delta = migration.bytes_sent + migration.bytes_received - sent - received
            return time.perf_counter() - start, delta, moved is not None

        out = {"steady": [], "staged": [], "staged_bytes": [], "switch_step": [], "world": [], "world_bytes": []}
        for _ in range(rounds):
            layers = build_layers(old, model, rank, group, seed, backend="torch")
            timed_step(layers)  # warm-up
            for index in range(len(layers)):
                migration = LayerMigration(layers[index], tables[index], loaders[index], None, copies_per_step)
                done = False
                while not done:
                    out["steady"].append(timed_step(layers))
                    seconds = timed_step(layers)
                    extra, moved, done = advance(migration)
                    out["staged"].append(seconds + extra)
                    out["staged_bytes"].append(moved)
                    out["switch_step"].append(done)
            layers = build_layers(old, model, rank, group, seed, backend="torch")
            timed_step(layers)
            seconds, moved = timed_step(layers), 0
            for index in range(len(layers)):
                migration = LayerMigration(layers[index], tables[index], loaders[index])
                extra, delta, _ = advance(migration)
                seconds, moved = seconds + extra, moved + delta
            out["world"].append(seconds)
            out["world_bytes"].append(moved)
        results.put((rank, out))
    finally:
        leave_group(created=True)


def cpu_table(model: ModelSpec, ranks: int, rounds: int, tokens: int, copies_per_step: int, seed: int) -> BenchTable:
    """Spawn the ranks, then steady vs staged vs stop-the-world step times (rank 0's clock; steps end on a barrier)."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=bench_rank, args=(r, ranks, port, model, rounds, tokens, copies_per_step, seed, results)) for r in range(ranks)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"bench ranks failed: exit codes {[proc.exitcode for proc in procs]}")
    by_rank = dict(results.get() for _ in range(ranks))
    out = by_rank[0]
    moved = [sum(by_rank[r][key][i] for r in range(ranks)) // 2 for key in ("staged_bytes", "world_bytes")
             for i in range(len(by_rank[0][key]))]
    staged_moved, world_moved = moved[: len(out["staged"])], moved[len(out["staged"]):]
    steady = float(np.median(out["steady"]))
    steady_worst = float(np.max(out["steady"]))
    rows = [("steady state", "0", f"{steady * 1e3:.1f} / {steady_worst * 1e3:.1f}", f"1.00 / {steady_worst / steady:.2f}",
             str(len(out["steady"])))]
    switch = np.array(out["switch_step"])
    staged, staged_moved = np.array(out["staged"]), np.array(staged_moved)
    for label, times, sizes in (("staged: copy-staging steps", staged[~switch], staged_moved[~switch]),
                                ("staged: switch steps (restack + vote)", staged[switch], staged_moved[switch]),
                                ("stop-the-world reload", np.array(out["world"]), np.array(world_moved))):
        median, worst = float(np.median(times)), float(np.max(times))
        rows.append((label, f"{sizes.max() / 1e6:.3f}", f"{median * 1e3:.1f} / {worst * 1e3:.1f}",
                     f"{median / steady:.2f} / {worst / steady:.2f}", str(len(times))))
    title = (f"Switch stall on {ranks} CPU gloo ranks, {model.name} ({model.num_layers} layers, {model.num_experts} "
             f"experts, H {model.hidden_size}, I {model.moe_intermediate_size}), {tokens} tokens per rank, {rounds} rounds, "
             f"staged {copies_per_step} changed copies per step")
    note = (f"step during a switch = the step + the migration after it; target <= {TARGET_RATIO}x steady. "
            f"{ranks} ranks share {os.cpu_count()} cores with the host's other load: wall times are noisy, "
            "MB moved per step (all ranks, peer + checkpoint) is the deterministic proxy.")
    header = ("phase", "MB moved in the step (max)", "step ms (median / worst)", "vs steady (median / worst)", "steps")
    return BenchTable(title, header, rows, note)


def build_parser() -> argparse.ArgumentParser:
    """Options of `rnq-ep bench rebalance`."""
    p = argparse.ArgumentParser(prog="rnq-ep bench rebalance", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=2, help="gloo worker processes")
    p.add_argument("--layers", type=int, default=4, help="layers of the CPU model")
    p.add_argument("--hidden", type=int, default=256, help="expert hidden size of the CPU model")
    p.add_argument("--inter", type=int, default=512, help="expert intermediate size of the CPU model")
    p.add_argument("--experts", type=int, default=16, help="experts of the CPU model (top-2)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    p.add_argument("--rounds", type=int, default=3, help="switch rounds (each: staged, then stop-the-world)")
    p.add_argument("--copies-per-step", type=int, default=2, help="changed copies staged between two steps")
    p.add_argument("--gpus", default="64,256,1024", help="GPU counts of the cost-model table")
    p.add_argument("--model-layers", type=int, default=4, help="layers planned per GPU count in the cost model")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run both parts and print them as markdown; 0 on success."""
    args = build_parser().parse_args(argv)
    model = msgspec.structs.replace(load_model("tiny"), name=f"tiny@{args.experts}x{args.hidden}x{args.inter}",
                                    num_layers=args.layers, num_experts=args.experts,
                                    hidden_size=args.hidden, moe_intermediate_size=args.inter)
    console = Console(highlight=False)
    with console.status(f"switching plans on {args.ranks} gloo ranks"):
        cpu = cpu_table(model, args.ranks, args.rounds, args.tokens, args.copies_per_step, args.seed)
    gpus = [int(g) for g in args.gpus.split(",")]
    cost = cost_model_table(gpus, args.model_layers, 4096, args.seed)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "rnq-ep bench rebalance " + " ".join(argv if argv is not None else sys.argv[1:])
    console.print(to_markdown([cpu, cost], command.strip(), machine, date), markup=False, soft_wrap=True)
    return 0


def _free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
