"""Seeded synthetic expert loads: Zipf over experts, per-layer hot sets that drift between windows.

A window is one stretch of traffic (counts [L, E]); planners see one window and are scored on the
next. Per layer, a random ranking of the experts gets Zipf weights `rank ** -exponent`, capped at
1/top_k (an expert serves at most every token once) with the surplus spread over the others.
Between windows a fraction `drift` of the rank positions, drawn at random, swap their experts, so
part of the hot set moves. Counts are multinomial draws of `tokens * top_k` assignments.
Rankings come from `seed` and the draws from `seed + 1`, so the same seed gives the same hot
sets at every token count. `sampled_windows` draws windows from a load file's own per-layer
frequencies instead: stationary traffic of one domain, where windows differ by sampling only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnq_ep.specs import LoadStats, SpecError

DEFAULT_DRIFT = 0.1  # mixed serving traffic; shipped real files of different corpora differ far more (see BENCHMARKS.md)


@dataclass(frozen=True)
class ZipfLoads:
    """A named synthetic generator: Zipf exponent over experts and drift of the hot set per window."""

    exponent: float
    drift: float = DEFAULT_DRIFT

    @property
    def label(self) -> str:
        """Short name for tables: 'zipf s=1.2 drift=0.25'."""
        return f"zipf s={self.exponent:g} drift={self.drift:g}"


def parse_zipf(text: str) -> ZipfLoads:
    """'zipf:S' or 'zipf:S:drift=D' -> ZipfLoads; SpecError naming the text otherwise."""
    parts = text.split(":")
    if parts[0] != "zipf" or len(parts) not in (2, 3):
        raise SpecError(f"--loads: expected a load file or zipf:S[:drift=D], got {text!r}")
    try:
        exponent = float(parts[1])
        drift = float(parts[2].removeprefix("drift=")) if len(parts) == 3 else DEFAULT_DRIFT
    except ValueError:
        raise SpecError(f"--loads: expected numbers in zipf:S[:drift=D], got {text!r}") from None
    if len(parts) == 3 and not parts[2].startswith("drift="):
        raise SpecError(f"--loads: the third part of {text!r} must be drift=D")
    if not (exponent >= 0 and 0 <= drift <= 1):
        raise SpecError(f"--loads: need exponent S >= 0 and 0 <= drift D <= 1, got {text!r}")
    return ZipfLoads(exponent, drift)


def capped_zipf(num_experts: int, exponent: float, cap: float) -> np.ndarray:
    """Zipf probabilities by rank [E], none above `cap` (the excess goes to the uncapped ranks)."""
    prob = np.arange(1, num_experts + 1, dtype=np.float64) ** -exponent
    prob /= prob.sum()
    capped = np.zeros(num_experts, dtype=bool)
    while (prob > cap * (1 + 1e-12)).any():
        capped |= prob > cap
        if capped.all():
            return np.full(num_experts, 1.0 / num_experts)
        free = 1.0 - cap * capped.sum()
        prob = np.where(capped, cap, prob * free / prob[~capped].sum())
    return prob


def hot_set_rankings(num_layers: int, num_experts: int, drift: float, windows: int, seed: int) -> np.ndarray:
    """Expert at each rank per window and layer [W, L, E]; each window re-draws `drift` of the ranks."""
    rng = np.random.default_rng(seed)
    ranking = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])  # [L, E]
    moved = int(round(drift * num_experts))
    out = [ranking.copy()]
    for _ in range(windows - 1):
        for row in ranking:
            ranks = rng.choice(num_experts, size=moved, replace=False)
            row[ranks] = row[rng.permutation(ranks)]
        out.append(ranking.copy())
    return np.stack(out)


def zipf_windows(
    loads: ZipfLoads, num_layers: int, num_experts: int, top_k: int, windows: int, tokens: int, seed: int
) -> np.ndarray:
    """Counts per window [W, L, E] int64: `tokens * top_k` assignments per layer and window."""
    if windows < 1 or num_layers < 1 or tokens < 1:
        raise SpecError(f"synthetic loads need windows, layers and tokens >= 1, got {windows}, {num_layers}, {tokens}")
    rankings = hot_set_rankings(num_layers, num_experts, loads.drift, windows, seed)
    by_rank = capped_zipf(num_experts, loads.exponent, 1.0 / top_k)
    rng = np.random.default_rng(seed + 1)
    counts = np.zeros(rankings.shape, dtype=np.int64)
    for w in range(windows):
        for layer in range(num_layers):
            prob = np.empty(num_experts)
            prob[rankings[w, layer]] = by_rank
            counts[w, layer] = rng.multinomial(tokens * top_k, prob)
    return counts


def sampled_windows(stats: LoadStats, windows: int, tokens: int, seed: int) -> np.ndarray:
    """Counts per window [W, L, E] int64: `tokens * top_k` assignments per layer, multinomial on `stats`' frequencies."""
    if windows < 1 or tokens < 1:
        raise SpecError(f"sampled windows need windows and tokens >= 1, got {windows}, {tokens}")
    counts = np.asarray(stats.counts, dtype=np.float64)  # [L, E]
    totals = counts.sum(axis=1, keepdims=True)
    if (totals <= 0).any():
        raise SpecError(f"{stats.model or 'load file'}: a layer with no tokens has no frequencies to sample from")
    rng = np.random.default_rng(seed)
    return rng.multinomial(tokens * stats.top_k, counts / totals, size=(windows, counts.shape[0]))


def window_stats(counts: np.ndarray, top_k: int, name: str) -> LoadStats:
    """One window's counts [L, E] as LoadStats, so planners take it like a load file."""
    return LoadStats(counts=counts.tolist(), num_experts=counts.shape[1], top_k=top_k, model=name)
