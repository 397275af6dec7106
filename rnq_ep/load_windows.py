"""The windows of loads `rnq-ep simulate` plans on and scores on, from load files (pure).

A pair of files (plan on one, score on the other, or one file twice: in sample); windows drawn from
one file's per-layer frequencies (stationary traffic of its domain: plan on each, score on the next);
windows drawn from a second file, all planned on the first (a shift of domain served for a while).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from rnq_ep.policies import Windows
from rnq_ep.specs import LoadStats, ModelSpec, SpecError, load_stats
from rnq_ep.synthetic import sampled_windows, window_stats


def real_windows(model: ModelSpec, loads: Path, eval_loads: Path | None) -> Windows:
    """One (plan on, score on) pair from load files; the same file twice when no --eval-loads."""
    plan_on = load_stats(loads, model)
    score_on = load_stats(eval_loads, model) if eval_loads else plan_on
    if len(score_on.counts) != len(plan_on.counts):
        raise SpecError(f"{eval_loads}: has {len(score_on.counts)} layers but {loads} has {len(plan_on.counts)}; layers are matched by position")
    return [(plan_on, score_on)]


def drawn(recorded: LoadStats, windows: int, tokens: int, seed: int) -> list[LoadStats]:
    """`windows` windows of `tokens` tokens drawn from `recorded`'s per-layer frequencies, with its layer ids and costs."""
    counts = sampled_windows(recorded, windows, tokens, seed)
    name = recorded.model or "load file"
    return [msgspec.structs.replace(window_stats(c, recorded.top_k, f"{name}, sampled window {w}"), layer_ids=recorded.layer_ids,
                                    sensitivity=recorded.sensitivity, importance=recorded.importance)  # calibrated costs stay
            for w, c in enumerate(counts)]


def drawn_windows(recorded: LoadStats, windows: int, tokens: int, seed: int) -> Windows:
    """Consecutive (plan on, score on) pairs of `windows` windows of `tokens` tokens drawn from `recorded`."""
    stats = drawn(recorded, windows, tokens, seed)
    return list(zip(stats[:-1], stats[1:]))


def shifted_windows(plan_on: LoadStats, served: LoadStats, windows: int, tokens: int, seed: int) -> Windows:
    """(plan_on, window) pairs for `windows` windows of `tokens` tokens drawn from `served`: one plan, many scored windows."""
    return [(plan_on, window) for window in drawn(served, windows, tokens, seed)]
