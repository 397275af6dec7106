"""Exact bytes of one routed expert in each storage format, and per-GPU memory budgets.

Layout (transformers MoE): gate_up_proj [2I, H] and down_proj [H, I] per expert; K is the input
dimension of each projection (H for gate_up, I for down).
- bf16: 2 bytes per weight.
- int8: 1 byte per weight + one fp32 scale per output channel (2I + H scales).
- int4: two 4-bit values per byte along K (K rounded up to even) + one fp16 scale per group of
  INT4_GROUP values along K, per output channel.
"""

from __future__ import annotations

import math

from rnq_ep.specs import ClusterSpec, ModelSpec, PlanOptions

INT4_GROUP = 128
INT8_SCALE_BYTES = 4  # fp32 per output channel
INT4_SCALE_BYTES = 2  # fp16 per (output channel, group of 128 along K)


def projection_bytes(out_features: int, in_features: int, fmt: str) -> int:
    """Bytes of one [out_features, in_features] weight matrix stored in `fmt`."""
    if fmt == "bf16":
        return out_features * in_features * 2
    if fmt == "int8":
        return out_features * in_features + out_features * INT8_SCALE_BYTES
    if fmt == "int4":
        packed = out_features * ((in_features + 1) // 2)
        scales = out_features * math.ceil(in_features / INT4_GROUP) * INT4_SCALE_BYTES
        return packed + scales
    raise ValueError(f"unknown weight format {fmt!r}, expected bf16, int8 or int4")


def expert_bytes(model: ModelSpec, fmt: str) -> int:
    """Bytes of one routed expert (gate_up [2I, H] + down [H, I]) of `model` in `fmt`."""
    h, i = model.hidden_size, model.moe_intermediate_size
    return projection_bytes(2 * i, h, fmt) + projection_bytes(h, i, fmt)


def plain_ep_budget(model: ModelSpec, num_gpus: int) -> int:
    """Bytes per GPU that plain EP uses: ceil(E/G) bf16 experts."""
    return math.ceil(model.num_experts / num_gpus) * expert_bytes(model, "bf16")


def gpu_budget(model: ModelSpec, cluster: ClusterSpec, options: PlanOptions | None = None) -> int:
    """Per-GPU expert memory budget in bytes for one layer: options override cluster; 'plain-ep' resolves."""
    if options is not None and options.memory_budget is not None:
        return options.memory_budget
    if cluster.expert_memory_budget == "plain-ep":
        return plain_ep_budget(model, cluster.num_gpus)
    return int(cluster.expert_memory_budget)
