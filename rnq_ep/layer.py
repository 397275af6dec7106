"""EPMoE: one expert-parallel MoE layer, router -> dispatch (routing inside) -> local experts -> combine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from rnq_ep.balance import SlotTable
from rnq_ep.dispatch import META_BYTES, Received, combine, dispatch, gather_counts, world_size
from rnq_ep.experts import ExpertWeights, LocalExperts
from rnq_ep.layout import (
    CAPACITY_FACTOR, CAPACITY_MAX_TOKENS, StepLayout, capacity_for, check_transport, local_counts, step_layout,
)
from rnq_ep.quotas import POLICIES, RouteTable, route_table
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
    bytes_on_wire: int  # what the dispatch all-to-all moves to other ranks (capacity: padded blocks)


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
        transport: str = "auto",
        capacity_factor: float = CAPACITY_FACTOR,
    ) -> None:
        """This rank's part of the layer from full expert weights w_gate_up [E, 2I, H], w_down [E, H, I], or from
        its own experts' weights alone: w_gate_up = expert -> (gate_up [2I, H], down [H, I]), w_down = None.

        `router_weight` is the gate matrix [E, H] (softmax, top-k, renormalised) or any callable
        x [T, H] -> (topk_ids [T, k], topk_weights [T, k]), e.g. a converted model's own router.
        `activation` and the optional biases gate_up_bias [E, 2I], down_bias [E, H] go to LocalExperts
        (GPT-OSS: "swiglu-oai" with biases, torch backend only). `transport`: "exact", "capacity", or
        "auto" (capacity up to CAPACITY_MAX_TOKENS tokens per rank when the step is compiled, captured in a CUDA
        graph or redo_overflow is off: eagerly its overflow check is a host read too; else exact); docs/runtime.md.
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
        check_transport(transport)
        if not capacity_factor >= 1.0:
            raise ValueError(f"capacity_factor must be >= 1, got {capacity_factor}")
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
        self._route: RouteTable | None = None  # route_table of self.table on the last x's device, built on first use
        self.transport = transport
        self.capacity_factor = capacity_factor
        self.redo_overflow = True  # eager capacity steps check overflow (one host read) and redo it exactly
        self.overflow: torch.Tensor | None = None  # [] bool, the last capacity step overflowed (read by step drivers)
        self.experts = LocalExperts(self.table, rank, w_gate_up, w_down, backend, activation, gate_up_bias, down_bias, h)
        self.shared_experts = shared_experts
        self._last_stats: LayerStats | None = None
        self._last_step: tuple[StepLayout, Received, RouteTable, int, float] | None = None  # read lazily by last_stats
        self.routed_counts: torch.Tensor | None = None  # [E] int64 on x's device; a load recorder sets it

    def switch_plan(self, table: SlotTable, experts: LocalExperts) -> None:
        """Serve from `table` and `experts` from the next forward on; the caller frees the old copies."""
        if table.num_gpus != self.table.num_gpus or table.num_experts != self.table.num_experts:
            raise ValueError(
                f"layer {self.layer}: new table has {table.num_gpus} GPUs, {table.num_experts} experts; "
                f"expected {self.table.num_gpus}, {self.table.num_experts}"
            )
        self.table, self.experts = table, experts
        self._route = None

    def route_table(self, device: torch.device) -> RouteTable:
        """route_table of the table being served, on `device`: kept between steps, rebuilt when either changes."""
        route = self._route
        if route is None or route.table is not self.table or route.device != device or route.policy != self.policy:
            route = self._route = route_table(self.table, self.rank, self.policy, device)
        return route

    @property
    def last_stats(self) -> LayerStats | None:
        """What the last forward did (read from the device on first access, not in the step)."""
        if self._last_stats is None and self._last_step is not None:
            self._last_stats = _stats_of(*self._last_step)
        return self._last_stats

    @last_stats.setter
    def last_stats(self, stats: LayerStats | None) -> None:
        self._last_stats, self._last_step = stats, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]: route with the layer's router, then forward_routed."""
        self._check_hidden(x)
        topk_ids, topk_weights = self.router(x)
        return self.forward_routed(x, topk_ids, topk_weights)

    def forward_routed(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
        gathered: torch.Tensor | None = None, transport: str | None = None,
    ) -> torch.Tensor:
        """x [T, H] with the caller's routing topk_ids/topk_weights [T, k] -> [T, H]; last_stats reads the step lazily.

        Decide (layout on the device), then move (dispatch, experts, combine). A rank with malformed
        inputs still takes part in every collective, with zeros, so that every rank raises together.
        `gathered`: this step's `gather` when the caller made it already.
        """
        inputs = self.step_inputs(x, topk_ids, topk_weights)
        return self.step(inputs, self.gather(inputs) if gathered is None else gathered, transport)

    def step_inputs(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> StepInputs:
        """This rank's inputs checked by shape (stand-ins if malformed) and counted; feeds a load recorder."""
        problem = input_problem(x, topk_ids, topk_weights, self.model)
        if problem is not None:
            x, topk_ids, topk_weights = stand_ins(x, self.model)
        flat_ids, counts, health = local_counts(topk_ids, self.model.num_experts)
        if self.routed_counts is not None:  # device-side accumulate: no host sync per step
            self.routed_counts += counts
        return StepInputs(x, topk_ids, topk_weights, flat_ids, counts, health, problem)

    def step(self, inputs: StepInputs, gathered: torch.Tensor, transport: str | None = None) -> torch.Tensor:
        """One step of `inputs` with this step's gathered counts [R, E + 2] (gather): -> [T, H]."""
        x, topk_ids, topk_weights, flat_ids, problem = (
            inputs.x, inputs.topk_ids, inputs.topk_weights, inputs.flat_ids, inputs.problem)
        transport = transport or self._transport(x.shape[0])
        route = self.route_table(x.device)
        world = self.table.num_gpus
        capacity = None
        if transport == "capacity":
            capacity = capacity_for(x.shape[0], self.model.top_k, world, self.capacity_factor)
        layout = step_layout(topk_ids, flat_ids, gathered, route, transport, capacity)
        try:
            recv, received = dispatch(x, topk_weights, layout, route.num_local, self.rank, self.group, world)
        except ValueError as err:
            raise ValueError(f"layer {self.layer}: {problem or err}") from None
        compiling = torch.compiler.is_compiling()
        cpu_start = 0.0 if compiling else time.thread_time()
        y = self.experts(recv, received.offsets, received.weights)  # [N, H], router-weighted
        expert_cpu_seconds = 0.0 if compiling else time.thread_time() - cpu_start
        out = combine(y, layout, received, x.shape[0], x.dtype, self.group, world)  # [T, H]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self._last_stats = None
        self._last_step = (layout, received, route, x.shape[1] * x.element_size(), expert_cpu_seconds)
        if capacity is not None:
            self.overflow = layout.overflow
            if self.redo_overflow and not compiling and bool(layout.overflow):
                return self.step(inputs, gathered, "exact")
        return out

    def gather(self, inputs: StepInputs) -> torch.Tensor:
        """All ranks' counts [E] and health [2] (local_counts; a shape problem counts as one bad input): -> [R, E + 2]."""
        health = inputs.health
        if inputs.problem is not None:
            health = health + torch.tensor([1, 0], device=health.device)
        return gather_counts(torch.cat([inputs.counts, health]), self.group, self.table.num_gpus)

    def _transport(self, num_tokens: int) -> str:
        """The transport of a step of num_tokens tokens per rank (same on every rank when their T and mode agree).

        Capacity saves the host read only where nothing checks its overflow flag per layer: compiled or
        CUDA-graph steps, or callers that set redo_overflow = False and check once per model step. An eager
        step that checks would read the device once anyway, with more ops than exact."""
        if self.transport != "auto":
            return self.transport
        graphed = (torch.compiler.is_compiling() or not self.redo_overflow
                   or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))
        return "capacity" if graphed and num_tokens <= CAPACITY_MAX_TOKENS else "exact"

    def _check_hidden(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.model.hidden_size:
            raise ValueError(
                f"layer {self.layer}: x has shape {tuple(x.shape)}, model {self.model.name!r} expects "
                f"[tokens, hidden_size={self.model.hidden_size}]"
            )


@dataclass(frozen=True)
class StepInputs:
    """One rank's step inputs as the layer step takes them (stand-ins of the model's shapes if malformed)."""

    x: torch.Tensor  # [T, H]
    topk_ids: torch.Tensor  # [T, k]
    topk_weights: torch.Tensor  # [T, k]
    flat_ids: torch.Tensor  # [T*k] int64 clamped into [0, E)
    counts: torch.Tensor  # [E] int64 this rank's (token, k) per expert
    health: torch.Tensor  # [2] int64 out-of-range ids, the first of them
    problem: str | None  # what is wrong with the shapes, or None


def input_problem(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, model: ModelSpec
) -> str | None:
    """What is wrong with this rank's input shapes (static: no data is read), or None."""
    if x.dim() != 2 or x.shape[1] != model.hidden_size:
        return f"x has shape {tuple(x.shape)}, model {model.name!r} expects [tokens, hidden_size={model.hidden_size}]"
    if topk_ids.dim() != 2 or tuple(topk_ids.shape) != (x.shape[0], model.top_k):
        return f"topk_ids has shape {tuple(topk_ids.shape)}, expected ({x.shape[0]}, {model.top_k}) for x of shape {tuple(x.shape)}"
    if topk_weights.shape != topk_ids.shape:
        return f"topk_weights has shape {tuple(topk_weights.shape)}, expected topk_ids' shape {tuple(topk_ids.shape)}"
    return None


def stand_ins(x: torch.Tensor, model: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero inputs of the model's shapes for a rank whose own are malformed: it joins the collectives, then raises."""
    tokens = x.shape[0] if x.dim() >= 1 else 0
    ids = torch.zeros(tokens, model.top_k, dtype=torch.int64, device=x.device)
    return x.new_zeros(tokens, model.hidden_size), ids, torch.zeros(tokens, model.top_k, device=x.device)


def _stats_of(
    layout: StepLayout, received: Received, route: RouteTable, row_bytes: int, expert_cpu_seconds: float
) -> LayerStats:
    """LayerStats of one step (host reads: made when the stats are read, not in the step).

    Bytes to other ranks: a row carries the token and k x (local copy, weight). bytes_sent counts the
    rows that carry a token; the capacity transport sends its padded blocks whole (bytes_on_wire).
    Without dedupe every (token, k) would be a row with one (copy, weight).
    """
    per_gpu = layout.tokens_per_gpu.cpu().numpy().astype(np.int64)
    mean = per_gpu.mean() if per_gpu.size else 0.0
    top_k = layout.slots.shape[1]
    remote = torch.arange(route.num_gpus, device=layout.send_rows.device) != route.rank
    rows_sent = int(layout.send_rows[remote].sum())
    wire_rows = rows_sent if layout.capacity is None else (route.num_gpus - 1) * layout.capacity.peer_rows
    entries_sent = int((route.slot_gpu[layout.slots] != route.rank).sum())
    return LayerStats(
        tokens_per_gpu=per_gpu,
        tokens_per_copy=_table_order(received.offsets.diff().cpu().numpy().astype(np.int64), route),
        balancedness=float(per_gpu.max() / mean) if mean > 0 else 1.0,
        bytes_sent=rows_sent * (row_bytes + META_BYTES * top_k),
        bytes_sent_no_dedupe=entries_sent * (row_bytes + META_BYTES * top_k),
        bytes_on_wire=wire_rows * (row_bytes + META_BYTES * top_k),
        expert_cpu_seconds=expert_cpu_seconds,
    )


def _table_order(per_copy: np.ndarray, route: RouteTable) -> np.ndarray:
    """Per local copy values from the step's format-major order to table order: [C] -> [C]."""
    out = np.empty_like(per_copy)
    out[route.local_table_index] = per_copy
    return out
