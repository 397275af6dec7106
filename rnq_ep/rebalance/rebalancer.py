"""The online loop between serving steps: record, re-plan in a background thread, migrate one layer per step.

Every rank runs the same control flow, and every decision that leads to a collective is made from
data all ranks share (the step number, broadcast status, the broadcast plan), so the collective
sequence is the same on every rank:
  every `interval` steps (window full, nothing in flight): all_reduce window counts; rank 0 starts
      the re-plan thread
  every step while a re-plan is in flight: broadcast rank 0's status (running, done, failed,
      timed out); when done, broadcast the Replan object
  every step while layers wait to move: advance the current LayerMigration by one chunk of
      `copies_per_step` changed copies (bounds the stall); one layer moves at a time (bounds the
      staging memory)
A re-plan that raises or outlives `timeout_s` is logged and counted; serving stays on the last
good plan. The re-plan thread is a daemon: a timed-out one is abandoned, not joined.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np
import torch
import torch.distributed as dist

from rnq_ep.balance import SlotTable
from rnq_ep.dispatch import world_size
from rnq_ep.layer import EPMoE
from rnq_ep.rebalance.migrate import ExpertLoader, FaultHook, LayerMigration, layer_device
from rnq_ep.rebalance.recorder import LoadRecorder
from rnq_ep.rebalance.replan import LayerDecision, Planner, Replan, plan_from_window, replan
from rnq_ep.specs import LayerPlan, Plan

log = logging.getLogger(__name__)

RUNNING, DONE, FAILED, TIMED_OUT = 0, 1, 2, 3
SHOWN_STALLS = 8  # switches listed in the summary line


@dataclass
class RebalanceHealth:
    """Counters of the online loop on this rank (identical on all ranks except bytes_sent)."""

    replans_started: int = 0
    replans_done: int = 0
    replans_failed: int = 0  # raised
    replans_timed_out: int = 0
    layers_switched: int = 0
    layers_kept: int = 0  # the move did not pay for itself
    layers_aborted: int = 0  # a rank failed to stage: every rank stayed on the old plan
    bytes_moved: int = 0  # all ranks, copies sent or reloaded, target formats
    bytes_if_bf16: int = 0  # the same copies if they were all bf16
    bytes_sent: int = 0  # this rank's payload
    stalls: list[tuple[int, int, float]] = field(default_factory=list)  # (step, layer, seconds) of the slowest chunk per layer

    def summary(self) -> str:
        """One log line: re-plans, layers switched, bytes moved, the stall of each switch (the last SHOWN_STALLS)."""
        shown = ", ".join(f"step {step} layer {layer} {seconds * 1e3:.1f} ms" for step, layer, seconds in self.stalls[-SHOWN_STALLS:])
        earlier = len(self.stalls) - SHOWN_STALLS
        return (
            f"re-plans {self.replans_done} done, {self.replans_failed} failed, {self.replans_timed_out} timed out; "
            f"layers switched {self.layers_switched}, kept {self.layers_kept}, aborted {self.layers_aborted}; "
            f"{self.bytes_moved / 1e6:.2f} MB moved ({self.bytes_if_bf16 / 1e6:.2f} MB if bf16); "
            f"stall per switch (slowest migration call): {shown or 'none'}{f' ({earlier} earlier)' if earlier > 0 else ''}"
        )


class Rebalancer:
    """Online rebalancing of `layers` (this rank's EPMoE of every plan layer) under `plan`."""

    def __init__(
        self,
        layers: list[EPMoE],
        plan: Plan,
        interval: int,
        window: int,
        tokens_per_gpu: int,
        timeout_s: float = 60.0,
        horizon_steps: int | None = None,
        planner: Planner = plan_from_window,
        load_expert: list[ExpertLoader] | None = None,
        fault: FaultHook | None = None,
        copies_per_step: int = 4,
    ) -> None:
        """Re-plan every `interval` steps from the last `window` steps; `load_expert[l]` reloads layer l's experts."""
        if interval < 1:
            raise ValueError(f"rebalance interval must be >= 1 step, got {interval}")
        self.layers, self.plan = layers, plan
        self.interval, self.timeout_s = interval, timeout_s
        self.horizon_steps = horizon_steps or interval
        self.tokens_per_gpu = tokens_per_gpu
        self.planner, self.load_expert, self.fault = planner, load_expert, fault
        self.copies_per_step = copies_per_step
        self.group = layers[0].group if layers else None
        self.rank = layers[0].rank if layers else 0
        self.device = layer_device(layers[0]) if layers else torch.device("cpu")
        self.recorder = LoadRecorder(len(layers), plan.model.num_experts, window, self.device)
        self.recorder.attach(layers)
        self.health = RebalanceHealth()
        self._in_flight = False
        self._job: dict = {}  # rank 0: thread, started, result, error
        self._pending: list[tuple[int, LayerPlan, LayerDecision]] = []  # layers still to move, in order
        self._migration: LayerMigration | None = None  # the layer being staged (_pending[0])
        self._migration_seconds = 0.0

    @property
    def world(self) -> int:
        """Ranks in the group (1 without a process group)."""
        return world_size(self.group)

    def after_step(self, step: int) -> float:
        """Between two steps: close the step's counts, then at most one of migrate / poll / start; seconds spent."""
        started = time.perf_counter()
        self.recorder.end_step()
        if self._pending:
            self._migrate_next(step)
        elif self._in_flight:
            self._poll()
        elif (step + 1) % self.interval == 0 and self.recorder.full:
            self._start(self.recorder.snapshot(self.group))
        return time.perf_counter() - started

    def _start(self, counts: np.ndarray) -> None:
        """Rank 0 launches the re-plan thread on the window counts [L, E]; all ranks mark it in flight."""
        self._in_flight = True
        self.health.replans_started += 1
        if self.rank != 0:
            return
        job: dict = {"started": time.monotonic()}
        plan = self.plan

        def work() -> None:
            try:
                job["result"] = replan(plan, counts, self.horizon_steps, self.tokens_per_gpu, self.planner)
            except Exception as error:  # reported through the status broadcast
                job["error"] = error

        job["thread"] = threading.Thread(target=work, name="rnq-ep-replan", daemon=True)
        job["thread"].start()
        self._job = job

    def _poll(self) -> None:
        """Broadcast rank 0's status; on done, broadcast the Replan and queue the layers that move."""
        status = torch.tensor([self._local_status()], dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.broadcast(status, src=0, group=self.group)
        code = int(status.item())
        if code == RUNNING:
            return
        self._in_flight = False
        if code == FAILED:
            self.health.replans_failed += 1
            if self.rank == 0:
                log.error("re-plan failed; serving stays on the last good plan", exc_info=self._job.get("error"))
            return
        if code == TIMED_OUT:
            self.health.replans_timed_out += 1
            log.error("re-plan took longer than %.1f s; abandoned, serving stays on the last good plan", self.timeout_s)
            return
        holder = [self._job.get("result")]
        if self.world > 1:
            dist.broadcast_object_list(holder, src=0, group=self.group)
        self._accept(holder[0])

    def _local_status(self) -> int:
        """Rank 0's view of its re-plan thread (other ranks report RUNNING: only rank 0's is broadcast)."""
        if self.rank != 0:
            return RUNNING
        if "error" in self._job:
            return FAILED
        if "result" in self._job:
            return DONE
        return TIMED_OUT if time.monotonic() - self._job["started"] > self.timeout_s else RUNNING

    def _accept(self, result: Replan) -> None:
        """Queue the layers whose move pays for itself; log bytes and what quantization saved."""
        self.health.replans_done += 1
        for index, (decision, layer_plan) in enumerate(zip(result.decisions, result.plan.layers)):
            if not decision.move:
                self.health.layers_kept += 1
                continue
            self._pending.append((index, layer_plan, decision))
            log.info(
                "layer %d: moving %d copies, %.2f MB (%.2f MB if bf16: quantized copies save %.0f %%), gain %.3g s vs cost %.3g s",
                decision.layer, decision.copies_moved, decision.bytes_moved / 1e6, decision.bytes_if_bf16 / 1e6,
                100.0 * (1 - decision.bytes_moved / max(decision.bytes_if_bf16, 1)), decision.gain_s, decision.cost_s,
            )

    def _migrate_next(self, step: int) -> None:
        """Stage the next chunk of the queued layer on all ranks; on an agreed failure drop the rest of this re-plan."""
        index, layer_plan, decision = self._pending[0]
        started = time.perf_counter()
        if self._migration is None:
            table = SlotTable.from_layer(layer_plan, self.plan.cluster.num_gpus, self.plan.model.num_experts)
            loader = None if self.load_expert is None else self.load_expert[index]
            self._migration = LayerMigration(self.layers[index], table, loader, self.fault, self.copies_per_step)
            self._migration_seconds = 0.0
        moved = self._migration.advance()
        self._migration_seconds = max(self._migration_seconds, time.perf_counter() - started)
        if moved is None:
            return
        self._migration = None
        self._pending.pop(0)
        self.health.bytes_sent += moved.bytes_sent
        if not moved.switched:
            self.health.layers_aborted += 1 + len(self._pending)
            self._pending.clear()
            log.error("layer %d: migration aborted on some rank; every rank stays on the old plan", moved.layer)
            return
        layers = list(self.plan.layers)
        layers[index] = layer_plan
        self.plan = msgspec.structs.replace(self.plan, layers=layers)
        self.health.layers_switched += 1
        self.health.bytes_moved += decision.bytes_moved
        self.health.bytes_if_bf16 += decision.bytes_if_bf16
        self.health.stalls.append((step, moved.layer, self._migration_seconds))
