"""A Ray job's steps: the driver feeds each step's batch and hears every rank's finished step.

One StepChannel actor per attempt sits between the driver and the workers. The driver builds a
step's whole batch (hidden [R*T, H] and per layer routing [R*T, k]: the rows rank r would draw
itself under torchrun, stacked in rank order), puts it in the object store once and gives the
channel its reference; each worker asks the channel for the step, reads the shared object and keeps
its own rows. Every rank reports each finished step (its StepStats, output included) back through
the channel, so the driver shows steps as they finish, and after a failure it knows which steps
every rank finished and replays only the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import ray
import torch

from rnq_ep.runtime.inputs import Batch, BatchSource, layer_counts, make_batch
from rnq_ep.runtime.worker import StepStats
from rnq_ep.specs import LoadStats, ModelSpec, Plan

FEED_AHEAD = 2  # batches fed beyond the last step every rank finished: workers rarely wait on the driver


@ray.remote(num_cpus=0)
class StepChannel:
    """Batch references in (driver -> workers), finished steps out (workers -> driver), for one attempt."""

    def __init__(self) -> None:
        self._batches: dict[int, list] = {}  # step -> [ObjectRef of the whole batch] (a list: Ray keeps it a reference)
        self._reports: list[tuple[int, StepStats]] = []
        self._closed = False
        self._changed = asyncio.Condition()

    async def feed(self, step: int, batch: list, drop_before: int) -> None:
        """Offer `step`'s batch; forget the batches of steps before `drop_before` (every rank finished them)."""
        async with self._changed:
            self._batches[step] = batch
            for old in [s for s in self._batches if s < drop_before]:
                del self._batches[old]
            self._changed.notify_all()

    async def batch(self, step: int, timeout_s: float) -> list:
        """[ObjectRef] of `step`'s whole batch, once the driver has fed it."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: step in self._batches), timeout_s)
            return self._batches[step]

    async def report(self, rank: int, stats: StepStats) -> None:
        """A rank finished a step."""
        async with self._changed:
            self._reports.append((rank, stats))
            self._changed.notify_all()

    async def reports(self, wait_s: float) -> list[tuple[int, StepStats]]:
        """(rank, stats) reported since the last call, waiting up to `wait_s` for the first one (not once closed)."""
        async with self._changed:
            if not (self._reports or self._closed):  # wait_for(..., 0) would cancel before looking: look first
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: bool(self._reports) or self._closed), wait_s)
                except asyncio.TimeoutError:
                    return []
            taken, self._reports = self._reports, []
            return taken

    async def close(self) -> None:
        """The workers are done: answer waiting report calls now."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()


SharedBatch = tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]  # a whole step in numpy: Ray reads it in place


def step_batches(plan: Plan, model: ModelSpec, loads: LoadStats | None, loads_after: LoadStats | None,
                 drift_step: int, tokens: int, seed: int) -> Callable[[int], SharedBatch]:
    """step -> the whole step's batch: every rank's make_batch stacked, hidden [R*T, H], routing [R*T, k] per layer."""
    counts = layer_counts(plan, loads)
    counts_after = counts if loads_after is None else layer_counts(plan, loads_after)

    def whole(step: int) -> SharedBatch:
        step_counts = counts_after if step >= drift_step else counts
        parts = [make_batch(model, step_counts, tokens, seed, rank, step) for rank in range(plan.cluster.num_gpus)]
        routing = [tuple(torch.cat([part[1][layer][i] for part in parts]).numpy() for i in (0, 1)) for layer in range(len(counts))]
        return torch.cat([hidden for hidden, _ in parts]).numpy(), routing

    return whole


def rank_batches(channel: ray.actor.ActorHandle, rank: int, tokens: int, timeout_s: float) -> BatchSource:
    """step -> this rank's rows [rank*T, (rank+1)*T) of the batch the driver fed `channel`."""
    rows = slice(rank * tokens, (rank + 1) * tokens)

    def own(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array[rows].copy())  # the shared object is read-only: copy this rank's rows only

    def mine(step: int) -> Batch:
        (ref,) = ray.get(channel.batch.remote(step, timeout_s))
        hidden, routing = ray.get(ref)
        return own(hidden), [(own(ids), own(weights)) for ids, weights in routing]

    return mine


class StepLog:
    """Every rank's finished steps across attempts; a step counts once all ranks finished it, every plan, in one attempt."""

    def __init__(self, world: int, plans: int = 1) -> None:
        self.world, self.plans = world, plans
        self.done: list[list[list[StepStats]]] = []  # [step][plan][rank], the steps 0..len-1 every rank finished
        self._partial: dict[int, dict[tuple[int, int], StepStats]] = {}  # step -> (plan, rank) -> stats, this attempt

    def add(self, reports: list[tuple[int, StepStats]]) -> list[list[list[StepStats]]]:
        """Take (rank, stats) reports; the steps they complete, [step][plan][rank] in step order."""
        for rank, stats in reports:
            self._partial.setdefault(stats.step, {})[stats.plan, rank] = stats
        finished = []
        while len(self._partial.get(len(self.done), {})) == self.world * self.plans:
            by_key = self._partial.pop(len(self.done))
            self.done.append([[by_key[plan, rank] for rank in range(self.world)] for plan in range(self.plans)])
            finished.append(self.done[-1])
        return finished

    def restart(self) -> int:
        """Drop what the failed attempt left unfinished; the first step to replay."""
        self._partial.clear()
        return len(self.done)

    def by_rank(self) -> list[list[StepStats]]:
        """[rank][run] stats of every finished step, step by step, plan by plan within a step."""
        return [[by_plan[rank] for step in self.done for by_plan in step] for rank in range(self.world)]
