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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from rnq_ep.layer import EPMoE, LayerStats, SharedExperts
from rnq_ep.rebalance.rebalancer import RebalanceHealth, Rebalancer
from rnq_ep.routing import POLICIES
from rnq_ep.runtime.inputs import (
    BatchSource, Routing, checkpoint_loader, layer_counts, make_batch, random_layer_weights, random_shared_experts,
)
from rnq_ep.specs import FORMATS, ModelSpec, Plan, SpecError, load_model, load_plan, load_stats
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


def _resolve_model(plan: Plan, model: str | ModelSpec | None) -> ModelSpec:
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
) -> list[EPMoE]:
    """This rank's EPMoE for every plan layer (with the model's shared experts, whole on every rank); each layer's
    full routed-expert tensors are dropped once sliced. spill_fmt: a SpillMoE per layer spilling in that format."""
    layers = []
    for index, layer_plan in enumerate(plan.layers):
        w_gate_up, w_down, router = random_layer_weights(model, index, seed, device)
        shared_experts = seeded_shared_experts(model, index, seed, device)
        args = (model, layer_plan, plan.cluster.num_gpus, rank, group, w_gate_up, w_down, router, shared_experts, policy, backend)
        layers.append(EPMoE(*args) if spill_fmt is None else SpillMoE(*args, spill_fmt=spill_fmt))
    return layers


def seeded_shared_experts(model: ModelSpec, layer: int, seed: int, device: torch.device | str = "cpu") -> SharedExperts | None:
    """The seeded shared experts of plan layer `layer` (whole on every rank), None for a model without them."""
    shared = random_shared_experts(model, layer, seed, device)
    return None if shared is None else SharedExperts(*shared)


def run_worker(
    rank: int,
    world_size: int,
    plan_path: str,
    model: str | ModelSpec | None = None,
    tokens: int = 256,
    steps: int = 5,
    loads: str | None = None,
    seed: int = 0,
    policy: str = "least-loaded",
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    keep_outputs: bool = False,
    timeout_s: float = 300.0,
    rebalance_interval: int = 0,
    rebalance_window: int = 0,
    rebalance_horizon: int = 0,
    rebalance_copies_per_step: int = 4,
    replan_timeout_s: float = 60.0,
    loads_after: str | None = None,
    drift_step: int = 0,
    batches: BatchSource | None = None,
    first_step: int = 0,
    on_step: Callable[[StepStats], None] | None = None,
    interleave: Sequence[str] = (),
    spill_fmt: str | None = None,
) -> list[StepStats]:
    """Run steps first_step..steps-1 of `tokens` tokens per rank through every plan layer; this rank's per-step stats.

    rebalance_interval > 0 re-plans online every that many steps from the last rebalance_window
    steps (0: the interval) and migrates changed copies one layer per step when the move pays for
    itself over rebalance_horizon steps (0: the interval), rebalance_copies_per_step changed copies
    staged between two steps; loads_after switches
    the routing distribution to another load file from step drift_step on (a drift scenario).
    batches(step) gives this rank's batch (a Ray driver feeds them; default make_batch from the
    load files and seed), and on_step gets each step's stats as soon as the step is done.
    interleave: more plans of the same layers run on the same batches, every step through each plan
    (order rotating by step, so none always runs first); stats in run order, tagged with `plan`.
    spill_fmt: every layer spills per step what stays over 1.3x the mean GPU load onto the least-loaded GPUs,
    sending expert copies in that format (LLEP: bf16 on a plain-EP plan with policy static; docs/policies.md).
    """
    plans = [load_plan(path) for path in (plan_path, *interleave)]
    plan = plans[0]
    for path, other in zip((plan_path, *interleave), plans):
        if other.cluster.num_gpus != world_size:
            raise SpecError(
                f"{path}: the plan has {other.cluster.num_gpus} GPUs but the world size is {world_size}; "
                f"launch with --nproc-per-node={other.cluster.num_gpus} or plan for {world_size} GPUs"
            )
        if [layer.layer for layer in other.layers] != [layer.layer for layer in plan.layers]:
            raise SpecError(f"{path}: interleaved plans must have the layers of {plan_path}")
    if interleave and rebalance_interval:
        raise SpecError("online rebalancing runs one plan; got interleaved plans too")
    if tokens < 1 or steps < 1:
        raise SpecError(f"tokens and steps must be >= 1, got tokens={tokens}, steps={steps}")
    if not 0 <= first_step < steps:
        raise SpecError(f"first_step must be in [0, steps={steps}), got {first_step}")
    if policy not in POLICIES:
        raise SpecError(f"unknown routing policy {policy!r}, expected one of {POLICIES}")
    if spill_fmt is not None and spill_fmt not in FORMATS:
        raise SpecError(f"spill format {spill_fmt!r}: expected one of {FORMATS}")
    if spill_fmt is not None and rebalance_interval:
        raise SpecError("spilling and online rebalancing together are not supported: migration restacks the layers "
                        "that spill; pick one")
    spec = _resolve_model(plan, model)
    for other in plans[1:]:
        _resolve_model(other, spec)
    if min(rebalance_interval, rebalance_window, rebalance_horizon) < 0:
        raise SpecError(
            "rebalance_interval, rebalance_window and rebalance_horizon must be >= 0, got "
            f"{rebalance_interval}, {rebalance_window}, {rebalance_horizon}"
        )
    counts = layer_counts(plan, None if loads is None else load_stats(loads))
    counts_after = counts if loads_after is None else layer_counts(plan, load_stats(loads_after))
    device = _device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    group, created = join_group(rank, world_size, device, timeout_s)
    layer_sets, rebalancer = [], None
    try:
        layer_sets = [build_layers(p, spec, rank, group, seed, policy, backend, device, spill_fmt) for p in plans]
        if rebalance_interval:
            loaders = [checkpoint_loader(spec, index, seed, device) for index in range(len(plan.layers))]
            rebalancer = Rebalancer(
                layer_sets[0], plan, rebalance_interval, rebalance_window or rebalance_interval, tokens, replan_timeout_s,
                rebalance_horizon or None, load_expert=loaders, copies_per_step=rebalance_copies_per_step,
            )
        batch_of = batches or (
            lambda step: make_batch(spec, counts_after if step >= drift_step else counts, tokens, seed, rank, step)
        )
        stats = []
        for step in range(first_step, steps):
            hidden, routing = batch_of(step)
            for index in [(step + i) % len(plans) for i in range(len(plans))]:
                stats.append(replace(run_step(step, layer_sets[index], hidden.to(device, dtype), routing, group, keep_outputs),
                                     plan=index))
                if rebalancer is not None:
                    seconds = rebalancer.after_step(step)
                    stats[-1] = replace(stats[-1], rebalance_seconds=seconds, rebalance=copy.deepcopy(rebalancer.health))
                    if rank == 0:
                        log.info("step %d rebalance: %.4f s after the step; %s", step, seconds, rebalancer.health.summary())
                if rank == 0:
                    log.info(
                        "step %d, plan %d: %.4f s, balancedness %.3f, tokens per GPU %s",
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
