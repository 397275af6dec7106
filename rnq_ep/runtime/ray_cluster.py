"""Where Ray workers run: connecting to a cluster, the placement group, the worker actor, the torchrun env.

One actor per GPU (`num_gpus=1`, NCCL) or per CPU worker (fractional `num_cpus`, gloo), each in
its own bundle of a PACK placement group; a plan over several nodes on a cluster of several nodes
gets one bundle per plan node (a node's worth of workers) with STRICT_SPREAD, so the GPUs that
the plan puts on one node share a Ray node. Every actor gets the torchrun env and calls the same
`run_worker` as torchrun. `ray_driver` runs jobs on these pieces and recovers from failures.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import msgspec
import numpy as np
import ray
import ray.exceptions
import torch
import torch.distributed as dist
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rnq_ep.hf_run import GenerationReport, run_on_rank
from rnq_ep.runtime.options import RunOptions
from rnq_ep.runtime.ray_steps import SharedBatch, rank_batches, step_batches
from rnq_ep.runtime.worker import free_port, leave_group, run_worker
from rnq_ep.specs import LoadStats, Plan, SpecError

PLACE_TIMEOUT_S = 30.0  # a placement group not ready by then cannot be placed (we do not wait for autoscaling)
CONNECT_TIMEOUT_S = 5.0


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot place the workers the plan needs."""


@dataclass(frozen=True)
class RayJob:
    """What the driver feeds and every worker runs: run_worker's options, the plans carried as bytes (no shared disk).

    With `hf` (a transformers model path or `tiny-<family>`), each rank instead converts that model
    for the plan and greedily generates `options.steps` tokens after an `options.tokens`-long builtin-text prompt.
    """

    options: RunOptions  # checked on the driver; model resolved to a ModelSpec, paths are the driver's
    plan: bytes  # plan JSON
    loads: LoadStats | None  # the driver draws every step's routing from these counts; None: uniform
    loads_after: LoadStats | None = None  # routing counts from step options.drift_step on (a drift scenario)
    interleave: tuple[bytes, ...] = ()  # more plan JSONs of the same layers, run on the same batches at every step
    hf: str | None = None

    @property
    def plan_spec(self) -> Plan:
        """The decoded plan."""
        return msgspec.json.decode(self.plan, type=Plan)

    def batches(self) -> Callable[[int], SharedBatch]:
        """step -> the whole step's batch the driver feeds: hidden [R*T, H], routing [R*T, k] per layer."""
        plan, options = self.plan_spec, self.options
        return step_batches(plan, options.model or plan.model, self.loads, self.loads_after, options.drift_step,
                            options.tokens, options.seed)

    def worker_options(self, plans: list[Path], first_step: int) -> RunOptions:
        """The options a worker runs: its copies of the plans, batches fed by the driver (no load files), from first_step."""
        return msgspec.structs.replace(self.options, plan=str(plans[0]), interleave=tuple(map(str, plans[1:])),
                                       loads=None, loads_after=None, drift_step=0, first_step=first_step)


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker runs."""

    rank: int
    actor_id: str
    node_id: str
    node_ip: str
    pid: int

    def describe(self) -> str:
        """'rank R (actor A, pid P on node N at IP)'."""
        return f"rank {self.rank} (actor {self.actor_id[:12]}, pid {self.pid} on node {self.node_id[:12]} at {self.node_ip})"


@dataclass(frozen=True)
class Placement:
    """How the plan's workers map onto bundles: rank r uses bundle r // per_bundle."""

    bundles: list[dict[str, float]]
    strategy: str  # PACK or STRICT_SPREAD
    cpus: float  # per worker (0 for GPU workers: Ray's default CPU is not reserved)
    gpus: float  # per worker
    per_bundle: int


@ray.remote
class EPWorker:
    """One rank: sets the torchrun env and calls run_worker."""

    def __init__(self, rank: int, cpus: float) -> None:
        self.rank = rank
        if cpus > 0:  # a fractional CPU worker: one thread, so 4 workers on 2 cores do not oversubscribe
            torch.set_num_threads(max(1, int(cpus)))

    def where(self) -> WorkerInfo:
        """This actor's rank, ids, node and pid."""
        context = ray.get_runtime_context()
        return WorkerInfo(self.rank, context.get_actor_id(), context.get_node_id(), ray.util.get_node_ip_address(), os.getpid())

    def gpu_ids(self) -> list[str]:
        """GPU ids Ray assigned to this actor (empty on CPU workers)."""
        return [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        """A TCP port free on this node a moment ago (the rendezvous port, found on rank 0)."""
        return free_port("")

    def run(self, job: RayJob, env: dict[str, str], channel: ray.actor.ActorHandle, first_step: int) -> None:
        """Set the torchrun env and run steps first_step.. on the batches fed through `channel`, reporting each step there."""
        os.environ.update(env)
        with tempfile.TemporaryDirectory(prefix="rnq-ep-") as folder:
            paths = [Path(folder, f"plan{index}.json") for index in range(1 + len(job.interleave))]
            for path, plan in zip(paths, (job.plan, *job.interleave)):
                path.write_bytes(plan)
            sent = []  # reports in flight; the run is finished once the channel holds every one
            options = job.worker_options(paths, first_step)
            run_worker(
                self.rank, int(env["WORLD_SIZE"]), options,
                batches=rank_batches(channel, self.rank, options.tokens, options.timeout_s),
                on_step=lambda stats: sent.append(channel.report.remote(self.rank, stats)),
            )
            ray.get(sent)

    def generate(self, job: RayJob, env: dict[str, str], prompts: np.ndarray) -> GenerationReport:
        """Set the torchrun env and greedy-generate the hf model from this rank's row of the driver's prompts [R, S]."""
        os.environ.update(env)
        return _generate(self.rank, int(env["WORLD_SIZE"]), job, torch.from_numpy(prompts[self.rank : self.rank + 1].copy()))


def _generate(rank: int, world_size: int, job: RayJob, prompt: torch.Tensor) -> GenerationReport:
    """Join the process group from the env and run hf_run.run_on_rank on `prompt` [1, S]: this rank's greedy generation."""
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    options = job.options
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=options.timeout_s))
    try:
        return run_on_rank(
            job.hf, job.plan_spec, rank, world_size, dist.group.WORLD, batch=1, prompt_len=options.tokens,
            new_tokens=options.steps, seed=options.seed, policy=options.policy, device=device, backend=options.backend,
            prompt=prompt,
        )
    finally:
        leave_group(created=True)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` ('auto', 'HOST:PORT'), or RAY_ADDRESS, or start a local one."""
    if num_cpus is not None and num_cpus < 1:
        raise SpecError(f"--num-cpus {num_cpus}: expected an integer >= 1")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:
        # a private local cluster needs no token; opting out keeps its output clean
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        return
    if address != "auto" and not address.startswith("ray://"):
        _probe(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: {err}") from None


def _probe(address: str) -> None:
    """Fail fast on an address nothing listens on (ray.init would retry for a minute or more)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r}: expected HOST:PORT, 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address}: {err}; start one with `ray start --head` "
            "or leave out the address to run on a local cluster"
        ) from None


def placement_for(plan: Plan, resources: dict[str, float], alive_nodes: int, cpus_per_worker: float | None = None) -> Placement:
    """Bundles for the plan's workers on a cluster with `resources` (totals) over `alive_nodes` nodes."""
    cluster, world = plan.cluster, plan.cluster.num_gpus
    if cluster.device == "gpu":
        cpus, gpus, kind = 0.0, 1.0, "GPU"
    else:
        cpus, gpus, kind = cpus_per_worker or min(1.0, resources.get("CPU", 0.0) / world), 0.0, "CPU"
    wanted, have = world * (gpus or cpus), resources.get(kind, 0.0)
    if wanted == 0 or wanted > have + 1e-9:
        hint = "" if kind == "GPU" else "; lower --cpus-per-worker"
        raise ClusterError(
            f"the plan {cluster.name!r} needs {world} {cluster.device.upper()} workers ({wanted:g} {kind}) "
            f"but the Ray cluster has {have:g} {kind}{hint}"
        )
    spread = cluster.nodes > 1 and alive_nodes > 1
    per_bundle = cluster.gpus_per_node if spread else 1
    bundle = {key: value * per_bundle for key, value in (("CPU", cpus), ("GPU", gpus)) if value > 0}
    return Placement([bundle] * (world // per_bundle), "STRICT_SPREAD" if spread else "PACK", cpus, gpus, per_bundle)


def reserve(placement: Placement) -> PlacementGroup:
    """Create the placement group and wait (bounded) until every bundle is placed."""
    pg = placement_group(placement.bundles, strategy=placement.strategy)
    try:
        ray.get(pg.ready(), timeout=PLACE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise ClusterError(
            f"could not place {len(placement.bundles)} bundles of {placement.bundles[0]} ({placement.strategy}) "
            f"within {PLACE_TIMEOUT_S:.0f} s; free resources: {ray.available_resources()}"
        ) from None
    return pg


def start_actors(pg: PlacementGroup, placement: Placement, world: int) -> list:
    """One EPWorker per rank, in its bundle."""
    return [
        EPWorker.options(
            num_cpus=placement.cpus, num_gpus=placement.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, rank // placement.per_bundle),
        ).remote(rank, placement.cpus)
        for rank in range(world)
    ]


def torchrun_env(workers: list[WorkerInfo], port: int, gpu_ids: list[list[str]] | None) -> list[dict[str, str]]:
    """Per rank: RANK, WORLD_SIZE, LOCAL_RANK (index on its node), MASTER_ADDR/PORT of rank 0's node."""
    by_node: dict[str, list[int]] = {}
    for info in workers:
        by_node.setdefault(info.node_id, []).append(info.rank)
    envs = []
    for info in workers:
        peers = by_node[info.node_id]
        env = {
            "RANK": str(info.rank), "WORLD_SIZE": str(len(workers)), "LOCAL_RANK": str(peers.index(info.rank)),
            "LOCAL_WORLD_SIZE": str(len(peers)), "MASTER_ADDR": workers[0].node_ip, "MASTER_PORT": str(port),
        }
        if gpu_ids is not None:
            # as Ray Train does: every rank on a node sees the node's GPUs and cuda:LOCAL_RANK is its own
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids[r][0] for r in peers)
        envs.append(env)
    return envs
