"""`rnq-ep bench rebalance`: the stall of an online switch, staged layer by layer vs stop-the-world.

CPU gloo part: spawned ranks serve a drifted load on plan A, then move to plan B (R&Q re-planned on
the new load, kept in place). Staged: `copies_per_step` changed copies of one layer after each step,
one layer at a time; stop-the-world: every layer migrates between two steps. A step during a switch
costs its own time plus the migration after it (on CPU the ranks do both in turn: no side stream);
it is compared with the steady steps interleaved right before and after it (`rebalance_stall.py`).
Bytes moved per step is the deterministic proxy of the stall.
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
from rnq_ep.bench.rebalance_stall import StepRecord, stall_rows
from rnq_ep.layer import EPMoE
from rnq_ep.memory import expert_bytes
from rnq_ep.planner import plan_rnq
from rnq_ep.rebalance.migrate import LayerMigration
from rnq_ep.rebalance.replan import placed_like
from rnq_ep.runtime.inputs import checkpoint_loader, make_batch
from rnq_ep.runtime.worker import build_layers, free_port, leave_group, run_step
from rnq_ep.specs import ModelSpec, Plan, PlanOptions, load_cluster, load_model
from rnq_ep.synthetic import ZipfLoads, window_stats, zipf_windows

TARGET_RATIO = 1.5  # no step during a switch slower than this times steady state


def drifted_plans(model: ModelSpec, num_ranks: int, seed: int, tokens: int) -> tuple[Plan, Plan, np.ndarray]:
    """(plan on the old load, plan on the new load placed as replan places it for `tokens` per worker, new counts
    [L, E]) for `num_ranks` CPU workers."""
    cluster = msgspec.structs.replace(load_cluster("cpu4"), name=f"cpu{num_ranks}", gpus_per_node=num_ranks)
    windows = zipf_windows(ZipfLoads(1.2, drift=1.0), model.num_layers, model.num_experts, model.top_k, 2, 4096, seed)
    options = PlanOptions(formats=("bf16", "int8", "int4"))
    old = plan_rnq(model, cluster, window_stats(windows[0], model.top_k, model.name), options)
    new = plan_rnq(model, cluster, window_stats(windows[1], model.top_k, model.name), options)
    layers = [placed_like(a, b, row, model, cluster, tokens) for a, b, row in zip(old.layers, new.layers, windows[1])]
    return old, msgspec.structs.replace(new, layers=layers), windows[1]


def bench_rank(
    rank: int, world: int, port: int, model: ModelSpec, rounds: int, tokens: int, copies_per_step: int, seed: int,
    results: mp.Queue,
) -> None:
    """One spawned rank: `rounds` of (staged switch, steady steps interleaved; then stop-the-world); puts its StepRecords."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        old, new, counts = drifted_plans(model, world, seed, tokens)
        group, g, e = dist.group.WORLD, world, model.num_experts
        tables = [SlotTable.from_layer(layer, g, e) for layer in new.layers]
        loaders = [checkpoint_loader(model, index, seed, "cpu") for index in range(len(tables))]
        for loader in loaders:  # the seeded stand-in draws its whole layer on first use (~50 ms here); a checkpoint reads one expert
            loader(0)
        hidden, routing = make_batch(model, list(counts.astype(np.float64)), tokens, seed, rank, 0)  # one batch for every step
        records: list[StepRecord] = []
        ordinal = lambda round_: sum(r.round == round_ for r in records)  # noqa: E731  (a steady step's place in its round)

        def timed(layers: list[EPMoE], kind: str, round_: int, position: tuple[int, int],
                  migrations: tuple[LayerMigration, ...] = ()) -> bool:
            """One step, then one advance() of each migration, barrier to barrier; True once they all switched."""
            step_s = run_step(len(records), layers, hidden, routing, group, False).seconds
            moved = sum(expert_bytes(model, m.fmt) for mig in migrations for m in mig.chunks[0] if m.kind in ("peer", "host"))
            start, done = time.perf_counter(), True
            for migration in migrations:
                move = migration.advance()
                if move is not None and not move.switched:
                    raise RuntimeError(f"layer {move.layer}: a benchmark migration did not switch")
                done = done and move is not None
            dist.barrier(group)
            migration_s = time.perf_counter() - start if migrations else 0.0
            kind = "switch" if kind == "staged" and done else kind
            records.append(StepRecord(kind, round_, position, step_s, migration_s, moved))
            return done

        for round_ in range(rounds):
            layers = build_layers(old, model, rank, group, seed, backend="torch")
            run_step(-1, layers, hidden, routing, group, False)  # warm-up
            for index in range(len(layers)):
                migration = LayerMigration(layers[index], tables[index], loaders[index], None, copies_per_step)
                chunk, done = 0, False
                while not done:
                    timed(layers, "steady", round_, (-1, ordinal(round_)))
                    done = timed(layers, "staged", round_, (index, chunk), [migration])
                    chunk += 1
            timed(layers, "steady", round_, (-1, ordinal(round_)))
            layers = build_layers(old, model, rank, group, seed, backend="torch")
            run_step(-1, layers, hidden, routing, group, False)
            timed(layers, "steady", round_, (-2, 0))
            everything = [LayerMigration(layer, table, loader) for layer, table, loader in zip(layers, tables, loaders)]
            timed(layers, "world", round_, (-1, -1), everything)
            timed(layers, "steady", round_, (-2, 1))
        results.put((rank, records))
    finally:
        leave_group(created=True)


def cpu_records(model: ModelSpec, ranks: int, rounds: int, tokens: int, copies_per_step: int, seed: int) -> list[StepRecord]:
    """Spawn the ranks; rank 0's StepRecords (its clock; every step and migration call ends on a barrier)."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=bench_rank, args=(r, ranks, port, model, rounds, tokens, copies_per_step, seed, results)) for r in range(ranks)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"bench ranks failed: exit codes {[proc.exitcode for proc in procs]}")
    return dict(results.get() for _ in range(ranks))[0]


def cpu_table(model: ModelSpec, ranks: int, rounds: int, tokens: int, copies_per_step: int, seed: int) -> BenchTable:
    """Each kind of step against its neighbouring steady steps, as a table."""
    records = cpu_records(model, ranks, rounds, tokens, copies_per_step, seed)
    labels = {"steady": "steady state (noise floor)", "staged": "staged: copy-staging steps",
              "switch": "staged: switch steps (last chunk + restack + vote)", "world": "stop-the-world reload (all layers)"}
    rows = [(labels[r.kind], f"{r.moved_mb:.3f}", f"{r.migration_ms[0]:.1f} / {r.migration_ms[1]:.1f}", f"{r.step_ms:.1f}",
             f"{r.ratio[0]:.2f} / {r.ratio[1]:.2f} / {r.ratio[2]:.2f}", f"{r.added[0]:.2f} / {r.added[1]:.2f}", str(r.steps))
            for r in stall_rows(records)]
    title = (f"Switch stall on {ranks} CPU gloo ranks, {model.name} ({model.num_layers} layers, {model.num_experts} "
             f"experts, H {model.hidden_size}, I {model.moe_intermediate_size}), {tokens} tokens per rank, {rounds} rounds, "
             f"staged {copies_per_step} changed copies per step")
    note = (f"A step during a switch = the step + the migration calls after it (on CPU the ranks do both in turn), "
            "divided by the mean of the steady steps right before and after it (same batch every step). 'worst position' "
            "= the slowest step of the migration (layer, chunk) by its median over the rounds: a stall that recurs, "
            f"not a one-off; target <= {TARGET_RATIO}x. {ranks} ranks share {os.cpu_count()} cores with the host's other "
            "load: single steps are noisy (see the steady row, the same statistic between steady steps); the migration "
            "call alone is short, so 1 + migration / median steady step is the steadier estimate. Checkpoint "
            "reloads come from seeded weights drawn before timing. MB moved "
            "(copies sent or reloaded, all ranks, the copies' formats) is the deterministic proxy of the stall.")
    header = ("phase", "MB moved in the step (max)", "migration ms after the step (median / worst position)",
              "step + migration ms (median)", "vs neighbouring steady steps (median / worst position / worst single)",
              "1 + migration / median steady step (median / worst position)", "steps")
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




if __name__ == "__main__":
    sys.exit(main())
