"""EPLB-compatible arrays derived from a Plan (never stored in it).

Physical slot p of a layer is local slot p % P_gpu of GPU p // P_gpu, where P_gpu is the largest
slot count any GPU holds in any layer. Where GPUs hold different slot counts (R&Q plans mix
formats), the missing slots read -1 in phy2log. log2phy lists an expert's physical slots in
(gpu, local index) order, -1 padded to the largest copy count of the plan.
"""

from __future__ import annotations

import numpy as np

from rnq_ep.specs import Plan


def slots_per_gpu(plan: Plan) -> int:
    """Largest number of slots one GPU holds in any layer of `plan`."""
    num_gpus = plan.cluster.num_gpus
    return max(
        int(np.bincount([s.gpu for s in layer.slots], minlength=num_gpus).max()) if layer.slots else 0
        for layer in plan.layers
    )


def plan_arrays(plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phy2log [L, G*P_gpu] -1 padded, log2phy [L, E, maxcopies] -1 padded, logcnt [L, E]) of `plan`."""
    num_layers, num_gpus, num_experts = len(plan.layers), plan.cluster.num_gpus, plan.model.num_experts
    per_gpu = slots_per_gpu(plan)
    phy2log = np.full((num_layers, num_gpus * per_gpu), -1, dtype=np.int64)
    logcnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    for i, layer in enumerate(plan.layers):
        gpu = np.array([s.gpu for s in layer.slots], dtype=np.int64)
        expert = np.array([s.expert for s in layer.slots], dtype=np.int64)
        # slots are ordered by gpu, so a slot's local index is its position after the GPU's first slot
        first = np.searchsorted(gpu, gpu, side="left")
        local = np.arange(gpu.size) - first
        phy2log[i, gpu * per_gpu + local] = expert
        logcnt[i] = np.bincount(expert, minlength=num_experts)
    max_copies = int(logcnt.max()) if logcnt.size else 0
    log2phy = np.full((num_layers, num_experts, max_copies), -1, dtype=np.int64)
    for i in range(num_layers):
        physical = np.flatnonzero(phy2log[i] >= 0)
        expert = phy2log[i, physical]
        order = np.argsort(expert, kind="stable")
        rank = np.arange(order.size) - np.searchsorted(expert[order], expert[order], side="left")
        log2phy[i, expert[order], rank] = physical[order]
    return phy2log, log2phy, logcnt
