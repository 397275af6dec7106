"""Run a plan on Ray: place the workers, feed them batches, gather each step; stop and name the culprit on failure.

The driver builds every step's batch and feeds it to the workers through a StepChannel actor
(`ray_steps`), a couple of steps ahead; the workers report each finished step back, and the driver
emits a "step" event once all ranks finished it. A worker that dies (killed, OOM, crashed) or
raises stops the whole group within a bounded time: the driver waits on every rank at once, and on
the first failure gives its peers a few seconds for the root cause to surface (a killed rank makes
its peers' collectives fail too), then kills the group. The error names the rank, actor, node and
cause. With restarts left, the group is rebuilt from the plan and resumes at the first step that
not every rank finished: finished steps are kept, the rest run on the same batches, so every step
is in the result exactly once. Bad input (SpecError) fails the same way every time and is not retried.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

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
from rnq_ep.hf_run import prompt_rows
from rnq_ep.runtime.options import RunOptions, check_inputs, check_model_or_hf
from rnq_ep.runtime.ray_steps import FEED_AHEAD, StepChannel, StepLog
from rnq_ep.specs import SpecError

FAILURE_GRACE_S = 3.0
LISTEN_S = 1.0  # how long one call for step reports waits on the channel before the driver asks again


class WorkerFailed(RuntimeError):
    """A worker died, raised or hung; the message names its rank, actor, node and the cause."""


@dataclass(frozen=True)
class JobResult:
    """The finished job: each rank's results, where the last attempt ran, and the restarts it took."""

    stats: list  # per rank: list[StepStats], one per step in step order, or a GenerationReport for an hf job
    workers: list[WorkerInfo]
    restarts: int
    first_steps: list[int] = field(default_factory=list)  # per attempt, the first step it ran (replays resume there)


@dataclass(frozen=True)
class Event:
    """A progress event for the driver's display; `actors` are the live worker handles in rank order."""

    kind: str  # placing | started | running | step | failed | restarting | done
    attempt: int
    message: str
    actors: list = field(default_factory=list)
    step_stats: list = field(default_factory=list)  # kind "step": [plan][rank] StepStats of the step every rank finished


EventSink = Callable[[Event], None]


def make_job(
    plan_path: str, loads_path: str | None = None, model: str | None = None, hf: str | None = None,
    loads_after: str | None = None, interleave: Sequence[str] = (), **fields: Any,
) -> RayJob:
    """RayJob of a plan path and RunOptions fields as keywords; plan contents are not checked (bench e2e runs EPLB
    plans over the cluster's budget on purpose): `job_for` of the checked options is what `rnq-ep run --ray` runs.

    `interleave`: more plans of the same layers that every step also runs, on the same batch (stats tagged `plan`).
    """
    check_model_or_hf(model, hf)
    options = RunOptions(plan=plan_path, loads=loads_path, model=model, loads_after=loads_after,
                         interleave=tuple(interleave), **fields)
    return job_for(options, hf, contents=False)


def job_for(options: RunOptions, hf: str | None = None, contents: bool = True) -> RayJob:
    """RayJob of `options`, its files read and checked on the driver (runtime.options.check_inputs, plan contents
    too unless `contents` is False), so bad input fails before any actor starts."""
    inputs = check_inputs(options, contents=contents)
    payloads = [Path(path).read_bytes() for path in (options.plan, *options.interleave)]
    return RayJob(msgspec.structs.replace(options, model=inputs.model if options.model else None), payloads[0],
                  inputs.loads, inputs.loads_after, tuple(payloads[1:]), hf)


def check_job_flags(max_restarts: int, cpus_per_worker: float | None) -> None:
    """Raise SpecError for a negative restart count or a CPU share per worker that is not a number > 0."""
    if max_restarts < 0:
        raise SpecError(f"--max-restarts {max_restarts}: expected an integer >= 0")
    if cpus_per_worker is not None and not (math.isfinite(cpus_per_worker) and cpus_per_worker > 0):
        raise SpecError(f"--cpus-per-worker {cpus_per_worker:g}: expected a number of CPUs > 0")


def run_job(
    job: RayJob, max_restarts: int = 0, cpus_per_worker: float | None = None, on_event: EventSink | None = None
) -> JobResult:
    """Run `job` on the connected cluster, rebuilding the worker group up to `max_restarts` times.

    A rebuilt group resumes at the first step that not every rank finished; finished steps are kept
    (an hf generation is one request and is replayed whole).
    """
    check_job_flags(max_restarts, cpus_per_worker)
    emit = on_event or (lambda event: None)
    log = StepLog(job.plan_spec.cluster.num_gpus, 1 + len(job.interleave))
    first_steps = []
    attempt = 0
    while True:
        first_steps.append(log.restart())
        try:
            stats, workers = _attempt(job, attempt, log, cpus_per_worker, emit)
            return JobResult(stats, workers, attempt, first_steps)
        except WorkerFailed as err:
            emit(Event("failed", attempt, str(err)))
            if attempt == max_restarts:
                raise
        attempt += 1
        resume = "" if job.hf else f", resuming at step {len(log.done)} of {job.options.steps}"
        emit(Event("restarting", attempt, f"restart {attempt}/{max_restarts}: rebuilding the worker group from the plan{resume}"))


def _attempt(job: RayJob, attempt: int, log: StepLog, cpus_per_worker: float | None, emit: EventSink) -> tuple[list, list[WorkerInfo]]:
    """One try: place, start, rendezvous, run (steps from log.restart() on); the group is always torn down."""
    plan, options = job.plan_spec, job.options
    world = plan.cluster.num_gpus
    alive = sum(1 for node in ray.nodes() if node["Alive"])
    placement = placement_for(plan, ray.cluster_resources(), alive, cpus_per_worker)
    emit(Event("placing", attempt, f"placing {world} workers: {len(placement.bundles)} x {placement.bundles[0]} ({placement.strategy})"))
    pg = reserve(placement)
    actors, channel = [], None
    try:
        channel = None if job.hf else StepChannel.remote()  # created first: its process starts alongside the workers'
        actors = start_actors(pg, placement, world)
        workers = _gather([a.where.remote() for a in actors], options.timeout_s, None, "starting")
        port = _gather([actors[0].free_port.remote()], options.timeout_s, workers, "starting")[0]
        gpu_ids = _gather([a.gpu_ids.remote() for a in actors], options.timeout_s, workers, "starting") if placement.gpus else None
        emit(Event("started", attempt, _placement_text(workers), actors))
        envs = torchrun_env(workers, port, gpu_ids)
        if job.hf:
            prompts = ray.put(prompt_rows(job.hf, world, options.tokens).numpy())  # [R, S], one row per rank
            refs = [actor.generate.remote(job, env, prompts) for actor, env in zip(actors, envs)]
            emit(Event("running", attempt, f"{world} workers generating {options.steps} tokens after a {options.tokens}-token "
                       f"prompt with {job.hf}", actors))
            stats = _gather(refs, options.timeout_s, workers, "running")
        else:
            feeder = _Feeder(job, channel, log, lambda done: emit(Event("step", attempt, f"step {done[0][0].step} done", actors, done)))
            refs = [actor.run.remote(job, env, channel, feeder.first_step) for actor, env in zip(actors, envs)]
            emit(Event("running", attempt, f"{world} workers running steps {feeder.first_step}..{options.steps - 1} of "
                       f"{options.tokens} tokens per worker, batches fed by the driver", actors))
            try:
                _gather(refs, options.timeout_s, workers, "running", feeder)
            except WorkerFailed as err:
                if len(log.done) < options.steps:
                    raise
                emit(Event("failed", attempt, f"{err}; every rank had finished every step: nothing to replay"))
            if len(log.done) < options.steps:  # every worker returned, yet a step was not reported by all ranks
                raise WorkerFailed(f"running: the workers returned but steps {len(log.done)}..{options.steps - 1} were not "
                                   "reported by every rank")
            stats = log.by_rank()
        emit(Event("done", attempt, "all workers finished", actors))
        return stats, workers
    finally:
        for actor in actors + ([channel] if channel else []):
            ray.kill(actor)
        remove_placement_group(pg)


class _Feeder:
    """The driver's side of one attempt's StepChannel: feeds batches FEED_AHEAD steps ahead, logs finished steps."""

    def __init__(self, job: RayJob, channel: ray.actor.ActorHandle, log: StepLog, on_step: Callable[[list], None]) -> None:
        self.channel, self.log, self.on_step, self.steps = channel, log, on_step, job.options.steps
        self.whole_batch = job.batches()
        self.first_step = self.next_feed = len(log.done)
        self.listening = None
        self._feed()

    def _feed(self) -> None:
        """Put the batches of the steps up to FEED_AHEAD past the last one every rank finished (one ray.put each)."""
        while self.next_feed < min(len(self.log.done) + FEED_AHEAD, self.steps):
            self.channel.feed.remote(self.next_feed, [ray.put(self.whole_batch(self.next_feed))], len(self.log.done))
            self.next_feed += 1

    def listen(self) -> ray.ObjectRef:
        """The pending call for step reports (a new one once the last has answered)."""
        if self.listening is None:
            self.listening = self.channel.reports.remote(LISTEN_S)
        return self.listening

    def heard(self, reports: list | None = None) -> bool:
        """Take the answered reports (or `reports`), show finished steps, feed more; True if a step finished."""
        if reports is None:
            reports, self.listening = ray.get(self.listening), None
        finished = self.log.add(reports)
        for step in finished:
            self.on_step(step)
        self._feed()
        return bool(finished)

    def drain(self) -> None:
        """Take every report still in the channel (the workers have returned or failed)."""
        ray.get(self.channel.close.remote())
        if self.listening is not None:
            self.heard()
        self.heard(ray.get(self.channel.reports.remote(0.0)))


def _placement_text(workers: list[WorkerInfo]) -> str:
    nodes = sorted({w.node_ip for w in workers})
    return f"{len(workers)} workers on {len(nodes)} node(s) ({', '.join(nodes)}), rendezvous at {workers[0].node_ip}"


def _gather(refs: list, timeout_s: float, workers: list[WorkerInfo] | None, phase: str, feeder: _Feeder | None = None) -> list:
    """ray.get of one ref per rank, failing fast on the first failure and naming the rank at fault.

    With a feeder, step reports are taken as they come and each finished step restarts the timeout.
    """
    pending = {ref: rank for rank, ref in enumerate(refs)}
    deadline = time.monotonic() + timeout_s
    failures: dict[int, BaseException] = {}
    try:
        while pending and not failures:
            listening = [feeder.listen()] if feeder else []
            ready, _ = ray.wait(list(pending) + listening, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(pending.values())
                raise WorkerFailed(f"{phase}: ranks {late} did not finish within {timeout_s:g} s (--timeout); stopped the job")
            if listening and ready[0] == listening[0]:
                if feeder.heard():
                    deadline = time.monotonic() + timeout_s
                continue
            failures.update(_failures(ready, pending))
        if failures:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=FAILURE_GRACE_S)
            failures.update(_failures(ready, pending))
    finally:
        if feeder:  # on a failure or a timeout too: steps every rank finished before it are kept
            feeder.drain()
    if failures:
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
