"""Export a plan as SGLang's `--init-expert-location` JSON."""

from __future__ import annotations

from typing import Any

import numpy as np

from rnq_ep.planner.arrays import plan_arrays
from rnq_ep.specs import Plan, SpecError


def export_sglang(plan: Plan) -> dict[str, Any]:
    """{"physical_to_logical_map": [L][G*P_gpu]}, one row per plan layer; SGLang's rows must match its own MoE layers.

    SGLang serves every physical slot in the model dtype with the same slot count on every GPU,
    so a plan with quantized copies or uneven slot counts cannot be expressed; that raises SpecError.
    """
    quantized = sorted({s.fmt for layer in plan.layers for s in layer.slots} - {"bf16"})
    if quantized:
        raise SpecError(
            f"export sglang: the plan stores copies as {quantized}; SGLang's expert location map holds "
            "only model-dtype experts. Plan with --formats bf16 to export."
        )
    phy2log, _, _ = plan_arrays(plan)
    empty_rows, empty_slots = np.nonzero(phy2log < 0)
    if empty_rows.size:
        per_gpu = phy2log.shape[1] // plan.cluster.num_gpus
        layer = plan.layers[int(empty_rows[0])].layer
        raise SpecError(
            f"export sglang: layer {layer}: GPU {int(empty_slots[0]) // per_gpu} holds fewer than {per_gpu} slots; "
            "SGLang needs the same number of physical experts on every GPU in every layer"
        )
    return {"physical_to_logical_map": phy2log.tolist()}
