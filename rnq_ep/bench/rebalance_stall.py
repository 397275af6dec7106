"""The stall statistic of `bench rebalance` (pure): each step during a switch against its neighbouring steady steps.

A 2-core box shared with other jobs makes single step times swing 2-3x, so a switch step is compared
with the steady steps right before and after it (the host's load is about the same), and the same
step of the migration (same layer, same chunk) is repeated over rounds: the median over rounds of
its ratio says whether that step is slow every time (a real stall) or was hit once (noise). Steady
steps get the same statistic against their own steady neighbours: the noise floor. The migration
call alone is short, so 1 + migration / median steady step is a steadier estimate of the same ratio.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

KINDS = ("steady", "staged", "switch", "world")  # steady; a copy-staging step; the layer's last call; all layers at once


@dataclass(frozen=True)
class StepRecord:
    """One timed step of one round, in the order the steps ran."""

    kind: str  # one of KINDS
    round: int
    position: tuple[int, int]  # (layer, chunk) of the migration call after the step; steady: (-1, ordinal in the round)
    step_s: float  # the serving step, barrier to barrier
    migration_s: float  # the migration calls after it, barrier to barrier (0 for steady)
    moved_bytes: int  # copies sent or reloaded by those calls, all ranks, target formats

    @property
    def seconds(self) -> float:
        """What a request waits for: the step plus the migration after it."""
        return self.step_s + self.migration_s


@dataclass(frozen=True)
class StallRow:
    """The statistic of one kind of step."""

    kind: str
    steps: int
    moved_mb: float  # the most any one step moved
    step_ms: float  # median of step + migration
    migration_ms: tuple[float, float]  # (median, worst position's median over rounds)
    added: tuple[float, float]  # 1 + migration / median steady step: (median, worst position); short calls, little noise
    ratio: tuple[float, float, float]  # vs neighbouring steady steps: (median, worst position's median over rounds, worst single)


def neighbour_ratios(records: list[StepRecord]) -> list[float]:
    """Per record: its seconds over the mean of the nearest steady steps before and after it in its round."""
    ratios = []
    for i, record in enumerate(records):
        same = [j for j, r in enumerate(records) if r.round == record.round and r.kind == "steady" and j != i]
        left, right = [j for j in same if j < i], [j for j in same if j > i]
        nearest = ([left[-1]] if left else []) + ([right[0]] if right else [])
        if not nearest:
            raise ValueError(f"round {record.round} has no steady step next to a {record.kind} step")
        ratios.append(record.seconds / float(np.mean([records[j].seconds for j in nearest])))
    return ratios


def stall_rows(records: list[StepRecord]) -> list[StallRow]:
    """One StallRow per kind present, in KINDS order."""
    ratios = neighbour_ratios(records)
    steady_s = float(np.median([r.step_s for r in records if r.kind == "steady"]))
    rows = []
    for kind in KINDS:
        mine = [(r, q) for r, q in zip(records, ratios) if r.kind == kind]
        if not mine:
            continue
        by_position: dict[tuple[int, int], list[tuple[StepRecord, float]]] = defaultdict(list)
        for record, ratio in mine:
            by_position[record.position].append((record, ratio))
        position_ratio = [float(np.median([q for _, q in group])) for group in by_position.values()]
        position_migration = [float(np.median([r.migration_s for r, _ in group])) for group in by_position.values()]
        rows.append(StallRow(
            kind=kind,
            steps=len(mine),
            moved_mb=max(r.moved_bytes for r, _ in mine) / 1e6,
            step_ms=float(np.median([r.seconds for r, _ in mine])) * 1e3,
            migration_ms=(float(np.median([r.migration_s for r, _ in mine])) * 1e3, max(position_migration) * 1e3),
            added=(1 + float(np.median([r.migration_s for r, _ in mine])) / steady_s, 1 + max(position_migration) / steady_s),
            ratio=(float(np.median([q for _, q in mine])), max(position_ratio), max(q for _, q in mine)),
        ))
    return rows
