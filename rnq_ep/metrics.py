"""Scores of a plan on a load: per-layer GPU loads, balancedness, LIS, quantized tokens, bytes per GPU.

Definitions (DESIGN.md, "Metrics"):
- GPU load `g_j`: (token, expert) assignments served by GPU j in one layer.
- balancedness: `max_j g_j / mean_j g_j`, under (a) the plan's shares (`share_quotas`), (b) the best
  split of each expert's tokens over its copies (`water_fill`, what least-loaded routing reaches),
  and (c) the LP bound of the placement (`lp_min_max_load`); 1.0 is perfect.
- LIS (R&Q's load imbalance score): `max_j n_j / (sum_j n_j / m)`, the heaviest hitter's load against
  an equal allocation. As in R&Q, the m devices are the model's m = E expert slots: n_j is the
  tokens one copy serves under the best split, so a replica that takes half of a hot expert's tokens
  halves its n_j, while the equal-allocation baseline total/E is the same for every policy.
- quantized fraction: tokens served by int8/int4 copies over all tokens, under the best split and
  under the plan's shares (least-loaded routing may send more to quantized copies than planned).
- bytes per GPU: sum of `memory.expert_bytes` of the GPU's copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnq_ep.balance import SlotTable, gpu_loads, lp_min_max_load, share_quotas, water_fill
from rnq_ep.memory import expert_bytes
from rnq_ep.specs import FORMATS, LoadStats, ModelSpec, Plan, SpecError

SUMMARY_KEYS = (
    "balancedness_shares",
    "balancedness_best",
    "balancedness_lp",
    "lis",
    "quantized_fraction",
    "quantized_fraction_shares",
)


@dataclass(frozen=True)
class PlanScore:
    """Per-layer scores of one plan on one load file; arrays are indexed by layer position."""

    layers: tuple[int, ...]  # decoder layer id of each row
    share_loads: np.ndarray  # [L, G] tokens per GPU under the plan's shares
    best_loads: np.ndarray  # [L, G] tokens per GPU under the best split (water-filling)
    lp_max_load: np.ndarray  # [L] LP optimum of the max GPU load for the placement
    balancedness_shares: np.ndarray  # [L] max/mean of share_loads
    balancedness_best: np.ndarray  # [L] max/mean of best_loads
    balancedness_lp: np.ndarray  # [L] lp_max_load / mean GPU load
    lis: np.ndarray  # [L] heaviest copy load / (tokens / experts)
    quantized_fraction: np.ndarray  # [L] tokens on int8/int4 copies / all tokens, best split
    quantized_fraction_shares: np.ndarray  # [L] the same under the plan's shares (what the planner budgeted)
    bytes_per_gpu: np.ndarray  # [L, G] expert weight bytes held by each GPU

    def summary(self) -> dict[str, dict[str, float]]:
        """min/median/max over layers of each scalar metric, plus the largest bytes on one GPU."""
        out = {key: min_median_max(getattr(self, key)) for key in SUMMARY_KEYS}
        out["max_bytes_per_gpu"] = min_median_max(self.bytes_per_gpu.max(axis=1))
        return out


def min_median_max(values: np.ndarray) -> dict[str, float]:
    """{'min', 'median', 'max'} of a 1-D array, as plain floats."""
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def balancedness(loads: np.ndarray) -> float:
    """max/mean of per-GPU loads [G]; 1.0 for an all-zero layer (nothing to balance)."""
    mean = float(np.mean(loads))
    return float(np.max(loads)) / mean if mean > 0 else 1.0


def load_imbalance_score(copy_loads: np.ndarray, num_experts: int) -> float:
    """R&Q's LIS of per-copy loads [S]: max / (sum / num_experts); 1.0 for an all-zero layer."""
    total = float(np.sum(copy_loads))
    return float(np.max(copy_loads)) / (total / num_experts) if total > 0 else 1.0


def quantized_fraction(table: SlotTable, quotas: np.ndarray) -> float:
    """Share of the tokens in quotas [S] that int8/int4 copies serve; 0.0 for an all-zero layer."""
    total = float(np.sum(quotas))
    return float(np.sum(quotas[table.fmt != 0])) / total if total > 0 else 0.0


def layer_tables(plan: Plan) -> list[SlotTable]:
    """One SlotTable per plan layer."""
    g, e = plan.cluster.num_gpus, plan.model.num_experts
    return [SlotTable.from_layer(layer, g, e) for layer in plan.layers]


def counts_matrix(plan: Plan, loads: LoadStats) -> np.ndarray:
    """Load counts as [L, E] int64, checked against the plan (layers matched by position)."""
    counts = np.asarray(loads.counts, dtype=np.int64)
    want = (len(plan.layers), plan.model.num_experts)
    if counts.shape != want:
        raise SpecError(
            f"loads: counts has shape {list(counts.shape)} but the plan has {want[0]} layers of "
            f"{want[1]} experts (layers are matched by position)"
        )
    return counts


def copy_bytes(model: ModelSpec, table: SlotTable) -> np.ndarray:
    """Weight bytes of each copy [S] in its format, int64."""
    per_fmt = np.array([expert_bytes(model, fmt) for fmt in FORMATS], dtype=np.int64)
    return per_fmt[table.fmt]


def gpu_bytes(model: ModelSpec, table: SlotTable) -> np.ndarray:
    """Expert weight bytes per GPU [G] of one layer's slot table, int64."""
    return np.bincount(table.gpu, weights=copy_bytes(model, table), minlength=table.num_gpus).astype(np.int64)


def score_plan(plan: Plan, loads: LoadStats) -> PlanScore:
    """Score `plan` on `loads` (may differ from the planning loads; same [L, E] shape required)."""
    counts = counts_matrix(plan, loads)
    tables = layer_tables(plan)
    share_rows, best_rows, lp, lis, quantized, quantized_shares, mem = [], [], [], [], [], [], []
    for table, row in zip(tables, counts):
        best, shares = water_fill(table, row), share_quotas(table, row)
        share_rows.append(gpu_loads(table, shares))
        best_rows.append(gpu_loads(table, best))
        lp.append(lp_min_max_load(table, row))
        lis.append(load_imbalance_score(best, table.num_experts))
        quantized.append(quantized_fraction(table, best))
        quantized_shares.append(quantized_fraction(table, shares))
        mem.append(gpu_bytes(plan.model, table))
    share_loads = np.array(share_rows, dtype=np.float64)
    best_loads = np.array(best_rows, dtype=np.float64)
    lp_max = np.array(lp, dtype=np.float64)
    mean = best_loads.mean(axis=1)
    return PlanScore(
        layers=tuple(layer.layer for layer in plan.layers),
        share_loads=share_loads,
        best_loads=best_loads,
        lp_max_load=lp_max,
        balancedness_shares=np.array([balancedness(r) for r in share_loads]),
        balancedness_best=np.array([balancedness(r) for r in best_loads]),
        balancedness_lp=np.where(mean > 0, lp_max / np.where(mean > 0, mean, 1.0), 1.0),
        lis=np.array(lis),
        quantized_fraction=np.array(quantized),
        quantized_fraction_shares=np.array(quantized_shares),
        bytes_per_gpu=np.array(mem, dtype=np.int64),
    )
