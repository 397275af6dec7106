"""EPMoE: one expert-parallel MoE layer, router -> dispatch (routing inside) -> local experts -> combine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rnq_ep.balance import SlotTable
from rnq_ep.dispatch import DispatchHandle, combine, dispatch, world_size
from rnq_ep.experts import ExpertWeights, LocalExperts
from rnq_ep.routing import POLICIES, SlotIndex, slot_index
from rnq_ep.specs import LayerPlan, ModelSpec

Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x [T, H] -> (ids [T, k], weights [T, k])


@dataclass(frozen=True)
class LayerStats:
    """What one forward of one layer did, as seen by one rank."""

    tokens_per_gpu: np.ndarray  # [R] rows each GPU computed (global)
    tokens_per_copy: np.ndarray  # [C] rows each of this rank's copies computed
    balancedness: float  # max / mean of tokens_per_gpu (1.0 = perfect; 1.0 when idle)
    bytes_sent: int  # this rank's dispatch payload, with dedupe
    bytes_sent_no_dedupe: int  # the same without dedupe (one row per (token, k))
    expert_cpu_seconds: float  # this rank's CPU time in its local experts (on CPU: the compute a
    # dedicated worker would spend, whatever the oversubscription; on GPU: launch overhead only)


def route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router, Mixtral/Qwen style: logits [T, E] -> (ids [T, k] int64, renormalised fp32 weights [T, k])."""
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    return ids, weights / weights.sum(dim=-1, keepdim=True)


def linear_router(router_weight: torch.Tensor, top_k: int) -> Router:
    """Router of a gate matrix router_weight [E, H]: x [T, H] -> route_topk(x @ W^T)."""
    return lambda x: route_topk(x.float() @ router_weight.float().T, top_k)


class SharedExperts(torch.nn.Module):
    """A layer's shared experts (DeepSeek): one dense SwiGLU that every token goes through, whole on every rank."""

    def __init__(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
        """w_gate_up [2I, H] (gate rows first, then up) and w_down [H, I], I the shared experts' total width."""
        super().__init__()
        if w_gate_up.dim() != 2 or w_down.dim() != 2 or tuple(w_gate_up.shape) != (2 * w_down.shape[1], w_down.shape[0]):
            raise ValueError(
                f"shared experts must be w_gate_up [2I, H] and w_down [H, I], got {tuple(w_gate_up.shape)} and "
                f"{tuple(w_down.shape)}"
            )
        self.register_buffer("w_gate_up", w_gate_up)
        self.register_buffer("w_down", w_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H], computed in x's dtype."""
        from rnq_ep.kernels.reference import gated  # kernels pull in triton: import late

        return gated(x @ self.w_gate_up.to(x.dtype).T) @ self.w_down.to(x.dtype).T  # [T, 2I] -> [T, I] -> [T, H]


class EPMoE(torch.nn.Module):
    """A MoE layer whose routed experts are spread over `num_gpus` ranks as `layer_plan` says."""

    def __init__(
        self,
        model: ModelSpec,
        layer_plan: LayerPlan,
        num_gpus: int,
        rank: int,
        group: dist.ProcessGroup | None,
        w_gate_up: torch.Tensor | ExpertWeights,
        w_down: torch.Tensor | None,
        router_weight: torch.Tensor | Router,
        shared_experts: torch.nn.Module | None = None,
        policy: str = "least-loaded",
        backend: str = "auto",
        activation: str = "silu",
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> None:
        """This rank's part of the layer from full expert weights w_gate_up [E, 2I, H], w_down [E, H, I], or from
        its own experts' weights alone: w_gate_up = expert -> (gate_up [2I, H], down [H, I]), w_down = None.

        `router_weight` is the gate matrix [E, H] (softmax, top-k, renormalised) or any callable
        x [T, H] -> (topk_ids [T, k], topk_weights [T, k]), e.g. a converted model's own router.
        `activation` and the optional biases gate_up_bias [E, 2I], down_bias [E, H] go to LocalExperts
        (GPT-OSS: "swiglu-oai" with biases, torch backend only).
        """
        super().__init__()
        world = world_size(group)
        if num_gpus != world:
            raise ValueError(
                f"layer {layer_plan.layer}: the plan has {num_gpus} GPUs but the process group has world size {world}; "
                f"launch with --nproc-per-node={num_gpus} or plan for {world} GPUs"
            )
        if not 0 <= rank < num_gpus:
            raise ValueError(f"rank {rank} out of range for a plan of {num_gpus} GPUs")
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}, expected one of {POLICIES}")
        e, h, i = model.num_experts, model.hidden_size, model.moe_intermediate_size
        weights = (("w_gate_up", w_gate_up, (e, 2 * i, h)), ("w_down", w_down, (e, h, i)),
                   ("gate_up_bias", gate_up_bias, (e, 2 * i)), ("down_bias", down_bias, (e, h)))
        for name, tensor, shape in weights:
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, model {model.name!r} expects {list(shape)}")
        if isinstance(router_weight, torch.Tensor):
            if tuple(router_weight.shape) != (e, h):
                raise ValueError(
                    f"router_weight has shape {tuple(router_weight.shape)}, model {model.name!r} expects [{e}, {h}]"
                )
            self.router = linear_router(router_weight, model.top_k)
        else:
            self.router = router_weight
        self.model = model
        self.layer = layer_plan.layer
        self.rank = rank
        self.group = group
        self.policy = policy
        self.table = SlotTable.from_layer(layer_plan, num_gpus, e)
        self._index: SlotIndex | None = None  # slot_index(self.table, device of the last x), built on first use
        self.experts = LocalExperts(self.table, rank, w_gate_up, w_down, backend, activation, gate_up_bias, down_bias, h)
        self.shared_experts = shared_experts
        self.last_stats: LayerStats | None = None
        self.routed_counts: torch.Tensor | None = None  # [E] int64 on x's device; a load recorder sets it

    def switch_plan(self, table: SlotTable, experts: LocalExperts) -> None:
        """Serve from `table` and `experts` from the next forward on; the caller frees the old copies."""
        if table.num_gpus != self.table.num_gpus or table.num_experts != self.table.num_experts:
            raise ValueError(
                f"layer {self.layer}: new table has {table.num_gpus} GPUs, {table.num_experts} experts; "
                f"expected {self.table.num_gpus}, {self.table.num_experts}"
            )
        self.table, self.experts = table, experts
        self._index = None

    def slot_index(self, device: torch.device) -> SlotIndex:
        """slot_index of the table being served, on `device`: kept between steps, rebuilt when either changes."""
        if self._index is None or self._index.table is not self.table or self._index.device != device:
            self._index = slot_index(self.table, device)
        return self._index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]: route with the layer's router, then forward_routed."""
        self._check_hidden(x)
        topk_ids, topk_weights = self.router(x)
        return self.forward_routed(x, topk_ids, topk_weights)

    def forward_routed(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        counts: tuple[torch.Tensor, np.ndarray] | None = None,
    ) -> torch.Tensor:
        """x [T, H] with the caller's routing topk_ids/topk_weights [T, k] -> [T, H]; records last_stats.

        Routing inputs are checked inside dispatch, where a bad rank makes every rank raise; the
        hidden size is checked after it, when all ranks are known to share one. `counts`: dispatch's
        gather_counts of these inputs, when the caller made that all-gather already.
        """
        index = self.slot_index(x.device)
        recv, handle = dispatch(x, topk_ids, topk_weights, self.table, self.rank, self.group, self.policy, index, counts)
        self._check_hidden(x)
        if self.routed_counts is not None:  # device-side accumulate: no host sync per step
            self.routed_counts += handle.expert_counts
        cpu_start = time.thread_time()
        y = self.experts(recv, handle.local_offsets, handle.recv_weights)  # [N, H], router-weighted
        expert_cpu_seconds = time.thread_time() - cpu_start
        out = combine(y, handle)  # [T, H]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self.last_stats = _stats_of(handle, expert_cpu_seconds)
        return out

    def _check_hidden(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.model.hidden_size:
            raise ValueError(
                f"layer {self.layer}: x has shape {tuple(x.shape)}, model {self.model.name!r} expects "
                f"[tokens, hidden_size={self.model.hidden_size}]"
            )


def _stats_of(handle: DispatchHandle, expert_cpu_seconds: float) -> LayerStats:
    """LayerStats from a dispatch handle's counters."""
    per_gpu = np.asarray(handle.tokens_per_gpu, dtype=np.int64)
    mean = per_gpu.mean() if per_gpu.size else 0.0
    return LayerStats(
        tokens_per_gpu=per_gpu,
        tokens_per_copy=np.asarray(handle.tokens_per_copy, dtype=np.int64),
        balancedness=float(per_gpu.max() / mean) if mean > 0 else 1.0,
        bytes_sent=int(handle.bytes_sent),
        bytes_sent_no_dedupe=int(handle.bytes_sent_no_dedupe),
        expert_cpu_seconds=expert_cpu_seconds,
    )
