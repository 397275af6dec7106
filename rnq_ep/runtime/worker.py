"""run_worker: the one entry every launcher calls (torchrun, Ray actors).

One rank: join the process group from the standard env, build this rank's share of every plan
layer from seeded random expert weights (identical on all ranks), then run `steps` steps of
`tokens` tokens per rank through all layers with routing drawn from a load file's distribution
(weights and batches: `runtime/inputs.py`).
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rnq_ep.layer import EPMoE, LayerStats, SharedExperts
from rnq_ep.rebalance.rebalancer import RebalanceHealth, Rebalancer
from rnq_ep.runtime.inputs import (
    BatchSource, Routing, checkpoint_loader, layer_counts, make_batch, random_shared_experts, seeded_experts, seeded_router,
)
from rnq_ep.runtime.options import RunOptions, check_inputs
from rnq_ep.specs import ModelSpec, Plan, SpecError
from rnq_ep.spill import SpillMoE, SpillStats

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StepStats:
    """One step over all plan layers, as seen by one rank."""

    step: int
    seconds: float  # wall time, barrier to barrier (the same on every rank up to timer noise)
    layers: list[LayerStats]
    output: torch.Tensor | None = None  # this rank's last hidden states [T, H] (keep_outputs=True)
    rebalance_seconds: float = 0.0  # spent after the step on recording, re-plan polling or migrating one layer
    rebalance: RebalanceHealth | None = None  # counters after the step (rebalance_interval > 0)
    plan: int = 0  # which plan ran the step: 0 run_worker's plan_path, i its interleave[i - 1]

    @property
    def balancedness(self) -> float:
        """Mean over layers of max/mean tokens per GPU."""
        return float(np.mean([s.balancedness for s in self.layers]))

    @property
    def expert_cpu_seconds(self) -> float:
        """This rank's CPU time inside its local experts, summed over layers."""
        return sum(s.expert_cpu_seconds for s in self.layers)

    @property
    def tokens_per_gpu(self) -> np.ndarray:
        """Rows each GPU computed, summed over layers: [R]."""
        return np.sum([s.tokens_per_gpu for s in self.layers], axis=0)

    @property
    def bytes_sent(self) -> int:
        """This rank's dispatch bytes over all layers, with dedupe."""
        return sum(s.bytes_sent for s in self.layers)

    @property
    def bytes_sent_no_dedupe(self) -> int:
        """This rank's dispatch bytes over all layers without dedupe."""
        return sum(s.bytes_sent_no_dedupe for s in self.layers)

    @property
    def spilling(self) -> bool:
        """True when the layers spill per step (SpillMoE), whether or not this step moved anything."""
        return any(isinstance(s, SpillStats) for s in self.layers)

    @property
    def spilled_bytes(self) -> int:
        """Expert weight bytes spilled between GPUs this step, all layers and ranks (0 without --spill)."""
        return sum(s.moved_bytes for s in self.layers if isinstance(s, SpillStats))


def _device() -> torch.device:
    """This rank's GPU (LOCAL_RANK among the visible ones; Ray shows each actor only its own) or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def join_group(rank: int, world_size: int, device: torch.device, timeout_s: float) -> tuple[dist.ProcessGroup | None, bool]:
    """(group, created): the existing default group, a new one from the env, or None alone without env."""
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise SpecError(f"an existing process group has world size {dist.get_world_size()}, expected {world_size}")
        return dist.group.WORLD, False
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return None, False
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.group.WORLD, True


def leave_group(created: bool) -> None:
    """Collect unreachable modules (they hold the group), then destroy the group if this process created it.

    Modules in reference cycles (transformers models) otherwise outlive the run and free the gloo group during
    interpreter shutdown, which aborts the process ("terminate called without an active exception"). On the
    way out of an error, the traceback's finished frames would keep the modules alive: their locals are cleared.
    """
    error = sys.exc_info()[1]
    if error is not None:
        traceback.clear_frames(error.__traceback__)  # frames still running (ours, the callers') are left as they are
    gc.collect()
    if created:
        dist.destroy_process_group()


def build_layers(
    plan: Plan,
    model: ModelSpec,
    rank: int,
    group: dist.ProcessGroup | None,
    seed: int,
    policy: str = "least-loaded",
    backend: str = "auto",
    device: torch.device | str = "cpu",
    spill_fmt: str | None = None,
    transport: str = "auto",
) -> list[EPMoE]:
    """This rank's EPMoE for every plan layer (with the model's shared experts, whole on every rank); a rank draws
    only the routed experts it holds copies of (seeded per expert, the same on every rank). spill_fmt: a SpillMoE per layer spilling in that format;
    transport: the layers' token dispatch (layout.TRANSPORTS)."""
    layers = []
    for index, layer_plan in enumerate(plan.layers):
        experts, router = seeded_experts(model, index, seed, device), seeded_router(model, index, seed, device)
        shared_experts = seeded_shared_experts(model, index, seed, device)
        args = (model, layer_plan, plan.cluster.num_gpus, rank, group, experts, None, router, shared_experts, policy, backend)
        layers.append(EPMoE(*args, transport=transport) if spill_fmt is None
                      else SpillMoE(*args, transport=transport, spill_fmt=spill_fmt))
    return layers


def seeded_shared_experts(model: ModelSpec, layer: int, seed: int, device: torch.device | str = "cpu") -> SharedExperts | None:
    """The seeded shared experts of plan layer `layer` (whole on every rank), None for a model without them."""
    shared = random_shared_experts(model, layer, seed, device)
    return None if shared is None else SharedExperts(*shared)


def run_worker(
    rank: int,
    world_size: int,
    options: RunOptions | str,
    batches: BatchSource | None = None,
    on_step: Callable[[StepStats], None] | None = None,
    **fields: Any,
) -> list[StepStats]:
    """Run steps first_step..steps-1 of `tokens` tokens per rank through every plan layer; this rank's per-step stats.

    options: a RunOptions, or a plan path with the other RunOptions fields as keywords. Its files are read and
    checked (runtime.options.check_inputs, plan contents left to the launchers) before the process group is joined.
    rebalance_interval > 0 re-plans online every that many steps from the last rebalance_window steps and migrates
    changed copies one layer per step when the move pays for itself over rebalance_horizon steps;
    loads_after switches the routing distribution to another load file from step drift_step on (a drift scenario).
    batches(step) gives this rank's batch (a Ray driver feeds them; default make_batch from the load files and
    seed), and on_step gets each step's stats as soon as the step is done. interleave: more plans of the same
    layers run on the same batches, every step through each plan (order rotating by step, so none always runs
    first); stats in run order, tagged with `plan`. spill_fmt: every layer spills per step what stays over 1.3x
    the mean GPU load onto the least-loaded GPUs, sending expert copies in that format (LLEP: bf16 on a plain-EP
    plan with policy static; docs/policies.md).
    """
    if isinstance(options, str):
        options = RunOptions(plan=options, **fields)
    elif fields:
        raise TypeError(f"run_worker: options given as a RunOptions and as keywords {sorted(fields)}")
    plans, spec, loads, loads_after = check_inputs(options, world_size, contents=False)
    plan = plans[0]
    counts = layer_counts(plan, loads)
    counts_after = counts if loads_after is None else layer_counts(plan, loads_after)
    device = _device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    group, created = join_group(rank, world_size, device, options.timeout_s)
    layer_sets, rebalancer = [], None
    try:
        layer_sets = [build_layers(p, spec, rank, group, options.seed, options.policy, options.backend, device,
                                   options.spill_fmt, options.transport) for p in plans]
        if options.rebalance_interval:
            interval = options.rebalance_interval
            loaders = [checkpoint_loader(spec, index, options.seed, device) for index in range(len(plan.layers))]
            rebalancer = Rebalancer(
                layer_sets[0], plan, interval, options.rebalance_window or interval, options.tokens,
                options.replan_timeout_s, options.rebalance_horizon or None, load_expert=loaders,
                copies_per_step=options.rebalance_copies_per_step,
            )
        batch_of = batches or (lambda step: make_batch(
            spec, counts_after if step >= options.drift_step else counts, options.tokens, options.seed, rank, step))
        stats = []
        for step in range(options.first_step, options.steps):
            hidden, routing = batch_of(step)
            for index in [(step + i) % len(plans) for i in range(len(plans))]:
                stats.append(replace(run_step(step, layer_sets[index], hidden.to(device, dtype), routing, group,
                                              options.keep_outputs), plan=index))
                if rebalancer is not None:
                    seconds = rebalancer.after_step(step)
                    stats[-1] = replace(stats[-1], rebalance_seconds=seconds, rebalance=copy.deepcopy(rebalancer.health))
                    if rank == 0:
                        log.info("step %d rebalance: %.4f s after the step; %s", step, seconds, rebalancer.health.summary())
                if rank == 0:
                    log.info(
                        "step %d, plan %d: %.4f s, balancedness %.3f, expert rows per GPU %s",
                        step, index, stats[-1].seconds, stats[-1].balancedness, stats[-1].tokens_per_gpu.tolist(),
                    )
                if on_step is not None:
                    on_step(stats[-1])
        return stats
    finally:
        layer_sets = rebalancer = None  # noqa: F841  (drop the group's users before leaving it)
        leave_group(created)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` ("": every interface) that was free a moment ago, for a rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_step(
    step: int,
    layers: list[EPMoE],
    hidden: torch.Tensor,
    routing: Routing,
    group: dist.ProcessGroup | None,
    keep_outputs: bool,
) -> StepStats:
    """One residual pass of hidden [T, H] through every layer with the given routing, timed barrier to barrier."""
    device = hidden.device
    _barrier(group, device)
    start = time.perf_counter()
    for layer, (ids, weights) in zip(layers, routing):
        hidden = hidden + layer.forward_routed(hidden, ids.to(device), weights.to(device))
    _barrier(group, device)
    seconds = time.perf_counter() - start
    return StepStats(step, seconds, [layer.last_stats for layer in layers], hidden.cpu() if keep_outputs else None)


def _barrier(group: dist.ProcessGroup | None, device: torch.device) -> None:
    """Line ranks up (and drain the GPU queue) so step times cover the slowest rank."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if group is not None:
        dist.barrier(group)
