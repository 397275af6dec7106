"""Slot arrays <-> LayerPlan, per-GPU bytes, and the InfeasiblePlan error shared by all planners."""

from __future__ import annotations

import numpy as np

from rnq_ep.memory import expert_bytes
from rnq_ep.specs import FORMATS, LayerPlan, ModelSpec, Slot, SpecError


class InfeasiblePlan(SpecError):
    """No plan fits: the message names the GPUs and how many bytes each is missing."""


def format_bytes(model: ModelSpec) -> np.ndarray:
    """Bytes of one expert per format code (0 bf16, 1 int8, 2 int4) -> [3] int64."""
    return np.array([expert_bytes(model, fmt) for fmt in FORMATS], dtype=np.int64)


def gpu_bytes(gpu: np.ndarray, fmt: np.ndarray, model: ModelSpec, num_gpus: int) -> np.ndarray:
    """Bytes held by each GPU for slots (gpu [S], fmt code [S]) -> [G] int64."""
    return np.bincount(gpu, weights=format_bytes(model)[fmt], minlength=num_gpus).astype(np.int64)


def raise_if_over_budget(held: np.ndarray, budget: int, what: str) -> None:
    """Raise InfeasiblePlan naming every GPU whose bytes `held` [G] exceed `budget`."""
    over = np.flatnonzero(held > budget)
    if over.size == 0:
        return
    shown = ", ".join(f"GPU {g}: {int(held[g] - budget)} bytes" for g in over[:8])
    more = f" and {over.size - 8} more GPUs" if over.size > 8 else ""
    raise InfeasiblePlan(
        f"{what}: {over.size} GPU(s) exceed the per-GPU budget of {budget} bytes; missing {shown}{more}"
    )


def layer_plan(layer: int, gpu: np.ndarray, expert: np.ndarray, fmt: np.ndarray, share: np.ndarray) -> LayerPlan:
    """LayerPlan from slot arrays [S]; slots are ordered by GPU, keeping the given order within a GPU."""
    order = np.argsort(gpu, kind="stable")
    slots = [
        Slot(gpu=g, expert=e, fmt=FORMATS[f], share=s)  # type: ignore[arg-type]  (tolist gives Python ints and floats)
        for g, e, f, s in zip(gpu[order].tolist(), expert[order].tolist(), fmt[order].tolist(), share[order].astype(np.float64).tolist())
    ]
    return LayerPlan(layer=layer, slots=slots)


def equal_shares(expert: np.ndarray, num_experts: int) -> np.ndarray:
    """Each copy's share when an expert's tokens split evenly over its copies -> [S] float64."""
    copies = np.bincount(expert, minlength=num_experts)
    return 1.0 / copies[expert]
