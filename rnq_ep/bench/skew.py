"""The most skewed layers of the real load files under plain EP: where balancing can gain the most.

`rnq-ep bench layer --most-skewed` runs the first of them, so its target speedup is one that a
placement can reach at all (plain EP's max/mean tokens per rank bounds every speedup).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from rnq_ep.bench.planner import SHARED_LOADS, SHIPPED_LOADS
from rnq_ep.metrics import balancedness
from rnq_ep.specs import CONFIG_DIR, LoadStats, load_model, load_stats


@dataclass(frozen=True)
class SkewedLayer:
    """One layer of one real load file and plain EP's max/mean tokens per rank on it."""

    model: str  # config name, the longest one that begins the file name
    path: Path
    position: int  # row of the file's counts
    layer_id: int  # decoder layer id
    plain_ep_balancedness: float


def skewed_layers(num_ranks: int, folders: tuple[Path, ...] = (SHIPPED_LOADS, SHARED_LOADS)) -> list[SkewedLayer]:
    """Every layer of every real load file whose model has a config, most skewed under plain EP first."""
    models = sorted((p.stem for p in (CONFIG_DIR / "models").glob("*.toml")), key=len, reverse=True)
    files = {p.name: p for folder in reversed(folders) if folder.is_dir() for p in folder.glob("*.json")}  # first folder wins
    found = []
    for name, path in sorted(files.items()):
        model = next((m for m in models if name.startswith(m)), None)
        if model is None:
            continue
        stats = load_stats(path, load_model(model))
        per_gpu = -(-stats.num_experts // num_ranks)  # plain EP: contiguous blocks of experts
        for position, row in enumerate(stats.counts):
            loads = np.bincount(np.arange(stats.num_experts) // per_gpu, weights=row, minlength=num_ranks)
            found.append(SkewedLayer(model, path, position, stats.layers[position], balancedness(loads)))
    return sorted(found, key=lambda layer: -layer.plain_ep_balancedness)


def single_layer(stats: LoadStats, position: int) -> LoadStats:
    """`stats` cut down to its layer at `position` (co-activation, which links layers, dropped)."""
    def row(table):
        return None if table is None else [table[position]]

    return msgspec.structs.replace(
        stats, counts=[stats.counts[position]], layer_ids=[stats.layers[position]], num_layers=None,
        importance=row(stats.importance), sensitivity=row(stats.sensitivity), gate_mass=row(stats.gate_mass),
        coactivation=None,
    )
