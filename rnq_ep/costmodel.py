"""Predicted MoE step time of a plan on a cluster (pure; a roofline plus link-bandwidth model).

Per layer and GPU j, with `t_c` the (token, copy) assignments of copy c in one step:
- compute_j = max(FLOPs_j / peak_flops, bytes_j / hbm_bytes_per_s), where
  FLOPs_j = sum_c t_c * 6*H*I * DEQUANT_FLOP_FACTOR[fmt_c]  (gate + up: 4HI, down: 2HI), and
  bytes_j = sum over copies with t_c >= 1 of expert_bytes(fmt_c)  (idle copies are not read)
          + sum_c t_c * H * 2 * 2  (bf16 activations in and out).
- comm_j = dispatch + combine. Tokens start spread evenly over the GPUs (each holds
  tokens_per_gpu), so GPU d receives load_d / G assignments from every GPU. Each (token, copy)
  moves H bf16 values each way (no dedupe of a token's copies on one GPU: an upper bound).
  NVLink and the NIC are separate links that run at once, so a phase takes
  max(intra time, inter time), each the larger of the GPU's send and receive bytes over that
  link's one-direction bandwidth; combine mirrors dispatch.
- latency: every layer step runs COLLECTIVES_PER_STEP collectives (a count exchange, dispatch,
  combine: what the capacity transport runs, and what DeepEP-style dispatch needs), each paying the
  cluster's fixed latency (inter-node when the cluster spans nodes); it is added to comm_j. At
  decode (tens of tokens per GPU) it is most of the step; at prefill it vanishes.
- layer time = max_j (compute_j + comm_j): no overlap of compute with communication (conservative;
  overlap would take max instead of sum).
Load files are rescaled to a step of `tokens_per_gpu * G` tokens, top_k assignments each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnq_ep.balance import SlotTable, share_quotas, water_fill
from rnq_ep.memory import expert_bytes
from rnq_ep.metrics import copy_bytes, counts_matrix
from rnq_ep.specs import FORMATS, ClusterSpec, LoadStats, ModelSpec, Plan

ACTIVATION_BYTES = 2  # bf16 hidden states on the wire and in HBM
# Extra arithmetic for dequantising int8/int4 weights inside the grouped GEMM (a few % of the
# matmul; it only matters when a layer is compute bound).
DEQUANT_FLOP_FACTOR = {"bf16": 1.0, "int8": 1.05, "int4": 1.10}
DEFAULT_TOKENS_PER_GPU = 4096  # a prefill-like step; use ~1..64 for decode
COLLECTIVES_PER_STEP = 3  # count exchange, dispatch, combine: the same for every policy


@dataclass(frozen=True)
class LayerTime:
    """Predicted time of one MoE layer, per GPU parts in seconds."""

    flop_s: np.ndarray  # [G] FLOPs / peak_flops
    hbm_s: np.ndarray  # [G] bytes read and written / hbm_bytes_per_s
    comm_s: np.ndarray  # [G] dispatch + combine
    total_s: float  # max over GPUs of compute + comm

    @property
    def compute_s(self) -> np.ndarray:
        """Roofline time per GPU [G]: the larger of FLOP and HBM time."""
        return np.maximum(self.flop_s, self.hbm_s)


def scale_counts(counts: np.ndarray, model: ModelSpec, num_gpus: int, tokens_per_gpu: int) -> np.ndarray:
    """Rescale one layer's counts [E] to a step of tokens_per_gpu * G tokens (top_k each), int64."""
    total = float(counts.sum())
    if total <= 0:
        return np.zeros_like(counts, dtype=np.int64)
    target = tokens_per_gpu * num_gpus * model.top_k
    return np.rint(counts * (target / total)).astype(np.int64)


def compute_time(
    model: ModelSpec, cluster: ClusterSpec, table: SlotTable, copy_tokens: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(FLOP time [G], HBM time [G]) of the expert GEMMs for copy_tokens [S] assignments per copy."""
    h, i = model.hidden_size, model.moe_intermediate_size
    factor = np.array([DEQUANT_FLOP_FACTOR[fmt] for fmt in FORMATS])[table.fmt]
    flops = np.bincount(table.gpu, weights=copy_tokens * 6.0 * h * i * factor, minlength=table.num_gpus)
    weights = np.where(copy_tokens >= 1, copy_bytes(model, table), 0.0)
    activations = copy_tokens * h * ACTIVATION_BYTES * 2
    hbm = np.bincount(table.gpu, weights=weights + activations, minlength=table.num_gpus)
    return flops / cluster.peak_flops, hbm / cluster.hbm_bytes_per_s


def link_time(cluster: ClusterSpec, send: np.ndarray, recv: np.ndarray) -> np.ndarray:
    """Time per GPU [G] to move send/recv bytes [2, G] (row 0 intra-node, row 1 inter-node) at once."""
    volume = np.maximum(send, recv)
    intra = volume[0] / cluster.intra_node_bytes_per_s
    inter = volume[1] / cluster.inter_node_bytes_per_s
    return np.maximum(intra, inter)


def all_to_all_time(model: ModelSpec, cluster: ClusterSpec, gpu_tokens: np.ndarray) -> np.ndarray:
    """Dispatch + combine time per GPU [G] when GPU j serves gpu_tokens[j] assignments."""
    g, per_node = cluster.num_gpus, cluster.gpus_per_node
    node_tokens = gpu_tokens.reshape(cluster.nodes, per_node).sum(axis=1)  # [N]
    same_node = np.repeat(node_tokens, per_node)  # [G] tokens served on this GPU's node
    total = gpu_tokens.sum()
    recv = np.stack([gpu_tokens * (per_node - 1) / g, gpu_tokens * (g - per_node) / g])
    send = np.stack([(same_node - gpu_tokens) / g, (total - same_node) / g])
    token_bytes = model.hidden_size * ACTIVATION_BYTES
    return 2.0 * link_time(cluster, send * token_bytes, recv * token_bytes) + collective_latency(cluster)


def collective_latency(cluster: ClusterSpec) -> float:
    """Fixed seconds of one layer step's collectives: COLLECTIVES_PER_STEP x the cluster's widest link latency."""
    latency = cluster.inter_node_latency_s if cluster.nodes > 1 else cluster.intra_node_latency_s
    return COLLECTIVES_PER_STEP * latency


def predict_layer_time(model: ModelSpec, cluster: ClusterSpec, table: SlotTable, copy_tokens: np.ndarray) -> LayerTime:
    """Predicted time of one layer given copy_tokens [S] (token, copy) assignments per copy."""
    copy_tokens = np.asarray(copy_tokens, dtype=np.float64)
    gpu_tokens = np.bincount(table.gpu, weights=copy_tokens, minlength=table.num_gpus)
    flop_s, hbm_s = compute_time(model, cluster, table, copy_tokens)
    comm = all_to_all_time(model, cluster, gpu_tokens)
    total = float(np.max(np.maximum(flop_s, hbm_s) + comm))
    return LayerTime(flop_s=flop_s, hbm_s=hbm_s, comm_s=comm, total_s=total)


def predict_plan(
    plan: Plan, loads: LoadStats, tokens_per_gpu: int = DEFAULT_TOKENS_PER_GPU, split: str = "best"
) -> np.ndarray:
    """Predicted seconds per layer [L]; split 'best' (least-loaded routing) or 'shares' (static)."""
    if split not in ("best", "shares"):
        raise ValueError(f"split must be 'best' or 'shares', got {split!r}")
    counts = counts_matrix(plan, loads)
    g, e = plan.cluster.num_gpus, plan.model.num_experts
    quotas_of = water_fill if split == "best" else share_quotas
    times = []
    for layer, row in zip(plan.layers, counts):
        table = SlotTable.from_layer(layer, g, e)
        scaled = scale_counts(row, plan.model, g, tokens_per_gpu)
        times.append(predict_layer_time(plan.model, plan.cluster, table, quotas_of(table, scaled)).total_s)
    return np.array(times)


def weight_move_time(model: ModelSpec, cluster: ClusterSpec, moves: list[tuple[int, int, str]]) -> float:
    """Seconds to copy expert weights, each move (src_gpu, dst_gpu, fmt), all at once (LLEP-style)."""
    send = np.zeros((2, cluster.num_gpus))
    recv = np.zeros((2, cluster.num_gpus))
    for src, dst, fmt in moves:
        if src == dst:
            continue
        link = int(cluster.node_of(src) != cluster.node_of(dst))
        size = expert_bytes(model, fmt)
        send[link, src] += size
        recv[link, dst] += size
    return float(np.max(link_time(cluster, send, recv), initial=0.0))
