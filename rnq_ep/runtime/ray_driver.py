"""Run a plan on Ray: place the workers, rendezvous, run, gather stats; stop and name the culprit on failure.

A worker that dies (killed, OOM, crashed) or raises stops the whole group within a bounded time:
the driver waits on every rank's result at once, and on the first failure gives its peers a few
seconds for the root cause to surface (a killed rank makes its peers' collectives fail too), then
kills the group. The error names the rank, actor, node and cause. With restarts left, the group
is rebuilt from the plan and the job replayed: run_worker returns its stats only at the end, so a
failed attempt has finished nothing and the replay runs every step again with the same seeds,
giving the same outputs. Bad input (SpecError) fails the same way every time and is not retried.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
import ray.exceptions
from ray.util.placement_group import remove_placement_group

from rnq_ep.runtime.ray_cluster import (
    RayJob,
    WorkerInfo,
    placement_for,
    reserve,
    start_actors,
    torchrun_env,
)
from rnq_ep.specs import SpecError, load_model, load_plan

FAILURE_GRACE_S = 3.0


class WorkerFailed(RuntimeError):
    """A worker died, raised or hung; the message names its rank, actor, node and the cause."""


@dataclass(frozen=True)
class JobResult:
    """The attempt that finished: each rank's result, where each rank ran, and the restarts it took."""

    stats: list  # per rank: list[StepStats] (one per step), or a GenerationReport for an hf job
    workers: list[WorkerInfo]
    restarts: int


@dataclass(frozen=True)
class Event:
    """A progress event for the driver's display; `actors` are the live worker handles in rank order."""

    kind: str  # placing | started | running | failed | restarting | done
    attempt: int
    message: str
    actors: list = field(default_factory=list)


EventSink = Callable[[Event], None]


def make_job(plan_path: str, loads_path: str | None = None, model: str | None = None, hf: str | None = None, **options) -> RayJob:
    """RayJob from files on the driver, checked here so a bad plan fails before any actor starts."""
    if model and hf:
        raise SpecError(f"--model {model} and --hf {hf}: give one (--hf runs a transformers model, --model the bare layers)")
    load_plan(plan_path)
    with open(plan_path, "rb") as f:
        plan = f.read()
    loads = None
    if loads_path is not None:
        if not os.path.exists(loads_path):
            raise SpecError(f"--loads {loads_path}: no such file")
        with open(loads_path, "rb") as f:
            loads = f.read()
    return RayJob(plan=plan, loads=loads, model=load_model(model) if model else None, hf=hf, **options)


def run_job(
    job: RayJob, max_restarts: int = 0, cpus_per_worker: float | None = None, on_event: EventSink | None = None
) -> JobResult:
    """Run `job` on the connected cluster, rebuilding the worker group up to `max_restarts` times."""
    if max_restarts < 0:
        raise SpecError(f"--max-restarts must be >= 0, got {max_restarts}")
    emit = on_event or (lambda event: None)
    attempt = 0
    while True:
        try:
            stats, workers = _attempt(job, attempt, cpus_per_worker, emit)
            return JobResult(stats, workers, attempt)
        except WorkerFailed as err:
            emit(Event("failed", attempt, str(err)))
            if attempt == max_restarts:
                raise
        attempt += 1
        emit(Event("restarting", attempt, f"restart {attempt}/{max_restarts}: rebuilding the worker group from the plan"))


def _attempt(job: RayJob, attempt: int, cpus_per_worker: float | None, emit: EventSink) -> tuple[list, list[WorkerInfo]]:
    """One try: place, start, rendezvous, run; the group is always torn down."""
    plan = job.plan_spec
    world = plan.cluster.num_gpus
    alive = sum(1 for node in ray.nodes() if node["Alive"])
    placement = placement_for(plan, ray.cluster_resources(), alive, cpus_per_worker)
    emit(Event("placing", attempt, f"placing {world} workers: {len(placement.bundles)} x {placement.bundles[0]} ({placement.strategy})"))
    pg = reserve(placement)
    actors = []
    try:
        actors = start_actors(pg, placement, world)
        workers = _gather([a.where.remote() for a in actors], job.timeout_s, None, "starting")
        port = _gather([actors[0].free_port.remote()], job.timeout_s, workers, "starting")[0]
        gpu_ids = _gather([a.gpu_ids.remote() for a in actors], job.timeout_s, workers, "starting") if placement.gpus else None
        emit(Event("started", attempt, _placement_text(workers), actors))
        refs = [actor.run.remote(job, env) for actor, env in zip(actors, torchrun_env(workers, port, gpu_ids))]
        work = (f"generating {job.steps} tokens after a {job.tokens}-token prompt with {job.hf}" if job.hf
                else f"running {job.steps} steps of {job.tokens} tokens per worker")
        emit(Event("running", attempt, f"{world} workers {work}", actors))
        stats = _gather(refs, job.timeout_s, workers, "running")
        emit(Event("done", attempt, "all workers finished", actors))
        return stats, workers
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(pg)


def _placement_text(workers: list[WorkerInfo]) -> str:
    nodes = sorted({w.node_ip for w in workers})
    return f"{len(workers)} workers on {len(nodes)} node(s) ({', '.join(nodes)}), rendezvous at {workers[0].node_ip}"


def _gather(refs: list, timeout_s: float, workers: list[WorkerInfo] | None, phase: str) -> list:
    """ray.get of one ref per rank, failing fast on the first failure and naming the rank at fault."""
    pending = {ref: rank for rank, ref in enumerate(refs)}
    deadline = time.monotonic() + timeout_s
    failures: dict[int, BaseException] = {}
    while pending and not failures:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            late = sorted(pending.values())
            raise WorkerFailed(f"{phase}: ranks {late} did not finish within {timeout_s:g} s (--timeout); stopped the job")
        failures.update(_failures(ready, pending))
    if failures:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=FAILURE_GRACE_S)
        failures.update(_failures(ready, pending))
        rank, err = min(failures.items(), key=lambda item: (_is_secondary(item[1]), item[0]))
        if isinstance(err, SpecError):  # bad input fails the same way on every try: no restart
            raise SpecError(f"rank {rank}: {getattr(err, 'cause', err)}") from None
        raise WorkerFailed(_failure_text(rank, err, workers, phase, len(refs))) from None
    return ray.get(refs)


def _failures(ready: list, pending: dict) -> dict[int, BaseException]:
    """Pop `ready` refs from `pending`; the ranks whose refs hold an error."""
    out = {}
    for ref in ready:
        rank = pending.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as err:
            out[rank] = err
    return out


def _is_secondary(err: BaseException) -> bool:
    """True for a collective that failed because a peer went away (not the root cause)."""
    if isinstance(err, ray.exceptions.RayActorError):
        return False
    cause = getattr(err, "cause", err)
    text = f"{type(cause).__name__} {cause}".lower()
    return any(word in text for word in ("gloo", "nccl", "distbackend", "connection", "peer", "timed out"))


def _failure_text(rank: int, err: BaseException, workers: list[WorkerInfo] | None, phase: str, world: int) -> str:
    """'worker rank R (actor, pid, node) of W died/raised while PHASE: CAUSE'."""
    who = workers[rank].describe() if workers else f"rank {rank}"
    if isinstance(err, ray.exceptions.RayActorError):
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "because" in line), lines[-1] if lines else "no reason given")
        return f"worker {who} of {world} died while {phase}: {reason}"
    cause = getattr(err, "cause", err)
    return f"worker {who} of {world} raised while {phase}: {type(cause).__name__}: {cause}"
