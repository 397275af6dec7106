"""Export a plan as the expert placement of a serving system: SGLang's `--init-expert-location` JSON and vLLM's
EPLB state arrays.

Both systems serve every physical expert in the model dtype and give every GPU the same number of
physical experts (physical = logical + redundant, split evenly over the EP ranks). So an int8/int4
copy is exported as a plain replica, and a GPU holding fewer slots than the fullest one is padded
with extra replicas of the most-copied experts it lacks; `export_losses` says what that costs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rnq_ep.memory import expert_bytes, gpu_budget
from rnq_ep.planner.arrays import plan_arrays, slots_per_gpu
from rnq_ep.specs import Plan

EXPORTS = ("sglang", "vllm")
SYSTEM_NAMES = {"sglang": "SGLang", "vllm": "vLLM"}


def uniform_phy2log(plan: Plan) -> np.ndarray:
    """phy2log [L, G*P_gpu] with every GPU's empty slots filled by the most-copied experts not already on it.

    Ties go to the lower expert id, so the export is deterministic.
    """
    phy2log, _, logcnt = plan_arrays(plan)
    per_gpu = slots_per_gpu(plan)
    filled = phy2log.copy()
    for layer in range(filled.shape[0]):
        most_copied_first = np.lexsort((np.arange(logcnt.shape[1]), -logcnt[layer]))  # [E]
        for gpu in range(plan.cluster.num_gpus):
            row = filled[layer, gpu * per_gpu:(gpu + 1) * per_gpu]  # a view: filled in place
            missing = np.flatnonzero(row < 0)
            extra = [e for e in most_copied_first if e not in row][: missing.size]
            row[missing] = extra
    return filled


def export_sglang(plan: Plan) -> dict[str, Any]:
    """{"physical_to_logical_map": [L][G*P_gpu]}: what SGLang's ExpertLocationMetadata.init_by_mapping reads from
    `--init-expert-location PATH.json`; one row per plan layer (SGLang wants one per MoE layer of its model)."""
    return {"physical_to_logical_map": uniform_phy2log(plan).tolist()}


def export_vllm(plan: Plan) -> dict[str, Any]:
    """vLLM's EplbState arrays (vllm/distributed/eplb/eplb_state.py): physical_to_logical_map [L, P],
    logical_to_physical_map [L, E, max replicas] (-1 padded, physical slots in order), logical_replica_count [L, E]."""
    phy2log = uniform_phy2log(plan)
    num_experts = plan.model.num_experts
    count = np.stack([np.bincount(row, minlength=num_experts) for row in phy2log])  # [L, E]
    log2phy = np.full((*count.shape, int(count.max())), -1, dtype=np.int64)
    for layer, row in enumerate(phy2log):
        for expert in range(num_experts):
            slots = np.flatnonzero(row == expert)
            log2phy[layer, expert, : slots.size] = slots
    return {"physical_to_logical_map": phy2log.tolist(), "logical_to_physical_map": log2phy.tolist(),
            "logical_replica_count": count.tolist()}


def export_losses(plan: Plan, system: str) -> list[str]:
    """One line per thing of the plan `system` cannot represent: quantized copies, padding slots, missing layers."""
    lines, system = [], SYSTEM_NAMES[system]
    slots = [s for layer in plan.layers for s in layer.slots]
    quantized = sum(s.fmt != "bf16" for s in slots)
    per_gpu = slots_per_gpu(plan)
    padding = len(plan.layers) * plan.cluster.num_gpus * per_gpu - len(slots)
    if quantized:
        held, budget = per_gpu * expert_bytes(plan.model, "bf16"), gpu_budget(plan.model, plan.cluster, plan.options)
        lines.append(
            f"{system} serves every expert in the model dtype: {quantized} of {len(slots)} int8/int4 copies are exported "
            f"as plain replicas, so a GPU holds {per_gpu} model-dtype experts per layer ({held / 2**20:,.0f} MiB against "
            f"the plan's {budget / 2**20:,.0f} MiB budget) and no token runs on a quantized copy"
        )
    if padding:
        lines.append(
            f"{system} needs the same number of experts on every GPU: {padding} empty slots (of "
            f"{len(plan.layers) * plan.cluster.num_gpus * per_gpu}) are filled with extra replicas of the most-copied experts"
        )
    if len(plan.layers) != plan.model.num_layers:
        lines.append(
            f"the plan covers {len(plan.layers)} of the model's {plan.model.num_layers} MoE layers "
            f"(layer ids {[layer.layer for layer in plan.layers]}); {system} needs one row per MoE layer: plan on loads of "
            "every layer"
        )
    return lines
