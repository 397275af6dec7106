"""How `rnq-ep bench e2e` runs plans: spawned gloo ranks, a Ray job, one GPU.

The spawned ranks build every row's layers from the same seeded weights and run them on the same
batches, interleaved step by step: EPMoE for routing-only policies, SpillMoE for LLEP and R&Q +
spill. Batches and weights are run_worker's (`runtime/inputs.py`), so every launcher's outputs
compare with `demo.unsharded_outputs`, the dense fp32 reference of the same draws (shared experts included).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import msgspec
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rnq_ep.balance import SlotTable
from rnq_ep.bench.layer import RANK_TIMEOUT_S
from rnq_ep.layer import EPMoE, SharedExperts
from rnq_ep.metrics import gpu_bytes
from rnq_ep.runtime.inputs import make_batch, random_layer_weights
from rnq_ep.runtime.ray_driver import make_job, run_job
from rnq_ep.runtime.worker import StepStats, free_port, leave_group, run_step, run_worker, seeded_shared_experts
from rnq_ep.specs import ModelSpec, Plan, encode_json, write_atomic
from rnq_ep.spill import SpillMoE


@dataclass(frozen=True)
class RowRun:
    """What the ranks build for one bench row."""

    plan: Plan
    routing: str  # a routing.POLICIES name: the split of each step (before spilling, for a spilling row)
    spill_fmt: str | None = None  # None: no spilling (EPMoE); else the format spilled bf16 copies travel in


def build_row(row: RowRun, index: int, weights: tuple, shared_experts: SharedExperts | None, num_ranks: int,
              rank: int) -> EPMoE:
    """One rank's layer `index` of the row: weights (w_gate_up [E, 2I, H], w_down [E, H, I], router [E, H]) and the
    layer's shared experts (None: the model has none)."""
    args = (row.plan.model, row.plan.layers[index], num_ranks, rank, dist.group.WORLD, *weights, shared_experts)
    if row.spill_fmt is None:
        return EPMoE(*args, policy=row.routing, backend="torch")
    return SpillMoE(*args, policy=row.routing, backend="torch", spill_fmt=row.spill_fmt)


def e2e_rank(rank: int, num_ranks: int, rows: list[RowRun], counts: list[np.ndarray], tokens: int, steps: int,
             seed: int) -> list[list[StepStats]]:
    """One rank: steps + 1 steps (the first warms up) of every row, outputs kept: stats [row][step]."""
    dist.init_process_group("gloo", rank=rank, world_size=num_ranks, timeout=timedelta(seconds=RANK_TIMEOUT_S))
    try:
        model = rows[0].plan.model
        layers: list[list[EPMoE]] = [[] for _ in rows]
        for index in range(len(rows[0].plan.layers)):
            weights, shared = random_layer_weights(model, index, seed), seeded_shared_experts(model, index, seed)
            for row, built in zip(rows, layers):
                built.append(build_row(row, index, weights, shared, num_ranks, rank))
        stats: list[list[StepStats]] = [[] for _ in rows]
        for step in range(steps + 1):
            hidden, routing = make_batch(model, counts, tokens, seed, rank, step)
            for built, out in zip(layers, stats):
                out.append(run_step(step, built, hidden, routing, dist.group.WORLD, keep_outputs=True))
        return stats
    finally:
        layers = []  # noqa: F841  (drop the group's users before leaving it)
        leave_group(created=True)


def spawn_e2e(num_ranks: int, rows: list[RowRun], counts: list[np.ndarray], tokens: int, steps: int,
              seed: int) -> list[list[list[StepStats]]]:
    """e2e_rank on `num_ranks` spawned processes (gloo over loopback, one thread each): stats [rank][row][step]."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with tempfile.TemporaryDirectory(prefix="rnq-ep-e2e-") as folder:
        mp.spawn(_rank_main, args=(num_ranks, env, folder, (rows, counts, tokens, steps, seed)), nprocs=num_ranks)
        return [pickle.loads((Path(folder) / f"rank{rank}.pkl").read_bytes()) for rank in range(num_ranks)]


def spill_figures(per_rank: list[list[StepStats]], model: ModelSpec, tables: list[SlotTable]) -> tuple[float, float, int]:
    """A spilling row's (median MB of weights moved per timed step, median copies moved, the most expert bytes one rank
    held for one layer with the copies spilled onto it): stats [rank][step] of SpillMoE layers, the plan's tables [L]."""
    steps = per_rank[0][1:]  # moved bytes and copies are the whole layer's: rank 0's view
    moved = [sum(layer.moved_bytes for layer in s.layers) / 1e6 for s in steps]
    copies = [sum(layer.spilled_copies for layer in s.layers) for s in steps]
    resident = [gpu_bytes(model, table) for table in tables]  # [L] of [R]
    peak = max(int(resident[index][rank]) + layer.received_bytes
               for rank, rank_steps in enumerate(per_rank) for s in rank_steps[1:]
               for index, layer in enumerate(s.layers))
    return float(np.median(moved)), float(np.median(copies)), peak


def run_ray(plan: Plan, routing: str, folder: Path, run_loads: Path, tokens: int, steps: int, seed: int,
            timeout_s: float, spill_fmt: str | None = None) -> list[list[StepStats]]:
    """One Ray job of the plan with a routing.POLICIES rule (steps + 1, the first warms up), spilling in
    `spill_fmt` if given, outputs kept: stats [rank][step]."""
    plan_path = folder / "plan.json"
    write_atomic(plan_path, encode_json(plan))
    job = make_job(str(plan_path), str(run_loads), tokens=tokens, steps=steps + 1, seed=seed,
                   policy=routing, backend="torch", keep_outputs=True, timeout_s=timeout_s, spill_fmt=spill_fmt)
    return run_job(job).stats


def single_gpu_plan(plan: Plan) -> Plan:
    """The plan's copies all on one GPU (world size 1), shares kept, for static routing on that GPU."""
    cluster = msgspec.structs.replace(plan.cluster, nodes=1, gpus_per_node=1, device="gpu")
    layers = [msgspec.structs.replace(layer, slots=[msgspec.structs.replace(s, gpu=0) for s in layer.slots])
              for layer in plan.layers]
    return msgspec.structs.replace(plan, cluster=cluster, layers=layers)


def run_single_gpu(plan: Plan, folder: Path, run_loads: Path, tokens: int, steps: int, seed: int) -> float:
    """Median step seconds of the plan at world size 1 on this process's GPU (static routing, auto kernels)."""
    plan_path = folder / "plan_gpu.json"
    write_atomic(plan_path, encode_json(single_gpu_plan(plan)))
    stats = run_worker(0, 1, str(plan_path), tokens=tokens, steps=steps + 1, loads=str(run_loads), seed=seed,
                       policy="static", backend="auto")
    return float(np.median([s.seconds for s in stats[1:]]))


def _rank_main(rank: int, num_ranks: int, env: dict, folder: str, args: tuple) -> None:
    """Child: rendezvous env, one compute thread, e2e_rank, its stats pickled into folder (an error: mp.spawn raises)."""
    os.environ.update(env)
    torch.set_num_threads(1)
    (Path(folder) / f"rank{rank}.pkl").write_bytes(pickle.dumps(e2e_rank(rank, num_ranks, *args)))
