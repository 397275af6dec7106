"""Calibration: run a transformers MoE model over text and record per-layer expert statistics.

Forward hooks on every experts module see `(hidden_states[T, H], top_k_index[T, k],
top_k_weights[T, k])` and accumulate, per MoE layer: routed (token, expert) counts, gate mass,
token-level co-activation with the next MoE layer, and per expert and format the gate-weighted
relative output error of the quantized expert. Only sums are kept, so memory does not grow with
the number of tokens. See docs/calibration.md.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from rnq_ep import hf
from rnq_ep.calibrate_command import check_options
from rnq_ep.quant import dequantize, quantize
from rnq_ep.specs import LoadStats, SpecError

MIN_SAMPLES = 4  # sensitivity rows per expert per batch even when the mean share is smaller
FALLBACK_ROWS = 64  # layer inputs kept to measure experts that no calibration token reached


def balanced_picks(
    flat_ids: torch.Tensor, num_experts: int, cap: int, generator: torch.Generator
) -> list[tuple[int, torch.Tensor]]:
    """(expert, positions into flat_ids [N]) per routed expert: all its selections, or `cap` drawn at random."""
    picks = []
    for expert in range(num_experts):
        positions = (flat_ids == expert).nonzero().flatten()
        if positions.numel() > cap:  # hot experts do not dominate the cost; rare ones keep every row
            positions = positions[torch.randperm(positions.numel(), generator=generator)[:cap]]
        if positions.numel():
            picks.append((expert, positions))
    return picks


class _Recorder:
    """Hook state and running sums for all MoE layers of one model."""

    def __init__(self, layers: list[nn.Module], formats: Sequence[str], cap_factor: float, seed: int):
        self.layers = layers
        self.formats = tuple(formats)
        self.cap_factor = cap_factor
        self.generator = torch.Generator().manual_seed(seed)
        num_layers, num_experts = len(layers), layers[0].gate_up_proj.shape[0]
        self.num_experts = num_experts
        self.arg_names = [list(inspect.signature(m.forward).parameters)[:3] for m in layers]
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.batch_counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.gate_mass = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.coactivation = torch.zeros(max(num_layers - 1, 0), num_experts, num_experts, dtype=torch.float64)
        self.error_sq = torch.zeros(num_layers, len(self.formats), num_experts, dtype=torch.float64)
        self.output_sq = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.fallback_x: list[torch.Tensor | None] = [None] * num_layers
        self.top_k: int | None = None
        self.recording = False
        self.drop: tuple[int, int] | None = None  # (layer index, expert) removed from the forward
        self.previous_onehot: torch.Tensor | None = None  # [T, E] of the last MoE layer this forward

    def routed(self, index: int, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """[hidden_states, top_k_index, top_k_weights] whether passed by position or by name."""
        names = self.arg_names[index]
        return [args[i] if i < len(args) else kwargs[names[i]] for i in range(3)]

    def pre_hook(self, index: int) -> Callable:
        def zero_dropped_expert(module: nn.Module, args: tuple, kwargs: dict):
            if self.drop is None or self.drop[0] != index:
                return None
            _, ids, weights = self.routed(index, args, kwargs)
            weights = weights.masked_fill(ids == self.drop[1], 0.0)
            if len(args) > 2:
                return args[:2] + (weights,) + args[3:], kwargs
            return args, {**kwargs, self.arg_names[index][2]: weights}

        return zero_dropped_expert

    def hook(self, index: int) -> Callable:
        def record(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if self.recording:
                self.record(index, *self.routed(index, args, kwargs))

        return record

    def record(self, index: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one forward's routing of layer `index`: x [T, H], ids [T, k], weights [T, k]."""
        num_tokens, top_k = ids.shape
        ids, weights = ids.detach().cpu(), weights.detach().cpu()  # sums live on the CPU, x stays where it is
        if self.top_k is not None and self.top_k != top_k:
            raise SpecError(f"MoE layer {index} routes top-{top_k}, earlier layers top-{self.top_k}")
        self.top_k = top_k
        flat_ids = ids.reshape(-1)  # [T, k] -> [T*k]
        flat_weights = weights.reshape(-1).to(torch.float64)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        self.batch_counts[index] = counts
        self.counts[index] += counts
        self.gate_mass[index].index_add_(0, flat_ids, flat_weights)
        onehot = torch.zeros(num_tokens, self.num_experts, dtype=torch.float64)
        onehot.scatter_(1, ids, 1.0)  # [T, E]: 1 where the token picked the expert
        if index > 0 and self.previous_onehot is not None:
            self.coactivation[index - 1] += self.previous_onehot.t() @ onehot  # [E, T] @ [T, E]
        self.previous_onehot = onehot
        if self.fallback_x[index] is None:
            self.fallback_x[index] = x[:FALLBACK_ROWS].detach().clone()
        cap = max(MIN_SAMPLES, math.ceil(self.cap_factor * num_tokens * top_k / self.num_experts))
        rows = torch.arange(num_tokens).repeat_interleave(top_k)  # [T*k] token of each selection
        for expert, picks in balanced_picks(flat_ids, self.num_experts, cap, self.generator):
            self.add_sensitivity(index, expert, x[rows[picks].to(x.device)], flat_weights[picks])

    def add_sensitivity(self, index: int, expert: int, x: torch.Tensor, weights: torch.Tensor) -> None:
        """Accumulate sum w^2 ||f - f_q||^2 and sum w^2 ||f||^2 over rows x [n, H], CPU weights [n]."""
        experts = self.layers[index]
        gate_up, down = (w.detach().to(torch.float32) for w in hf.canonical_weights(experts, expert))
        exact = hf.expert_forward(experts, expert, x, gate_up, down)  # [n, H] fp32
        w_sq = weights.to(torch.float64).square()
        self.output_sq[index, expert] += (w_sq * _row_norms_sq(exact)).sum()
        for f, fmt in enumerate(self.formats):
            q_gate_up, q_down = (dequantize(quantize(w, fmt)) for w in (gate_up, down))
            approx = hf.expert_forward(experts, expert, x, q_gate_up, q_down)
            self.error_sq[index, f, expert] += (w_sq * _row_norms_sq(exact - approx)).sum()

    @torch.no_grad()
    def sensitivity(self) -> list[list[dict[str, float]]]:
        """[L][E]{fmt: relative error}; experts no token reached are measured on stored layer inputs."""
        for index, fallback in enumerate(self.fallback_x):
            for expert in (self.output_sq[index] == 0).nonzero().flatten().tolist():
                self.add_sensitivity(index, expert, fallback, torch.ones(fallback.shape[0], dtype=torch.float64))
        ratio = (self.error_sq / self.output_sq.clamp_min(1e-300)[:, None, :]).sqrt()  # [L, F, E]
        return [
            [{fmt: float(ratio[layer, f, e]) for f, fmt in enumerate(self.formats)} for e in range(self.num_experts)]
            for layer in range(len(self.layers))
        ]


def _row_norms_sq(rows: torch.Tensor) -> torch.Tensor:
    """||row||^2 of rows [n, H] as float64 on the CPU."""
    return rows.square().sum(-1).cpu().to(torch.float64)


def _loss(model: nn.Module, batch: torch.Tensor) -> float:
    return float(model(input_ids=batch, labels=batch, use_cache=False).loss)


def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    formats: Sequence[str] = ("int8", "int4"),
    importance: str | None = None,
    cap_factor: float = 2.0,
    seed: int = 0,
    model_name: str = "",
    data_name: str = "",
    on_removal_forward: Callable[[int, int], None] | None = None,
) -> LoadStats:
    """LoadStats of `model` over token batches [B, S]: counts, gate mass, co-activation, sensitivity.

    on_removal_forward(done, total) is called after each removal-importance forward of a batch.
    """
    check_options(formats, importance, cap_factor)
    layers = hf.moe_layers(model)
    device = next(model.parameters()).device
    recorder = _Recorder([module for _, _, module in layers], formats, cap_factor, seed)
    removal = torch.zeros(len(layers), recorder.num_experts, dtype=torch.float64)
    handles = []
    for index, (_, _, module) in enumerate(layers):
        handles.append(module.register_forward_pre_hook(recorder.pre_hook(index), with_kwargs=True))
        handles.append(module.register_forward_hook(recorder.hook(index), with_kwargs=True))
    num_tokens = predicted_tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                recorder.recording, recorder.previous_onehot = True, None
                base_loss = _loss(model, batch)
                recorder.recording = False
                predicted = batch.shape[0] * (batch.shape[1] - 1)  # tokens the loss averages over
                num_tokens += batch.numel()
                predicted_tokens += predicted
                if importance == "removal":
                    used = recorder.batch_counts.nonzero().tolist()  # unused experts: delta is 0
                    for done, (index, expert) in enumerate(used, start=1):
                        recorder.drop = (index, expert)
                        removal[index, expert] += (_loss(model, batch) - base_loss) * predicted
                        if on_removal_forward is not None:
                            on_removal_forward(done, len(used))
                    recorder.drop = None
    finally:
        for handle in handles:
            handle.remove()
    if num_tokens == 0:
        raise SpecError("no calibration tokens: the batches were empty")
    return LoadStats(
        counts=recorder.counts.tolist(),
        num_experts=recorder.num_experts,
        top_k=recorder.top_k,
        layer_ids=[layer_id for layer_id, _, _ in layers],
        num_layers=len(layers),
        model=model_name,
        importance=(removal / predicted_tokens).tolist() if importance == "removal" else None,
        sensitivity=recorder.sensitivity(),
        coactivation=recorder.coactivation.round().long().tolist() if len(layers) > 1 else None,
        gate_mass=recorder.gate_mass.tolist(),
        description=_description(num_tokens, data_name, formats, cap_factor, importance),
    )


def _description(
    num_tokens: int, data_name: str, formats: Sequence[str], cap_factor: float, importance: str | None
) -> str:
    from transformers import __version__ as transformers_version

    text = (
        f"rnq-ep calibrate over {num_tokens} tokens of {data_name or 'the given batches'} "
        f"(transformers {transformers_version}). counts: (token, expert) top-k selections per MoE layer; "
        "gate_mass: summed router weights; coactivation[l][i][j]: tokens routed to expert i in MoE layer l "
        "and to j in MoE layer l+1; sensitivity[l][e][fmt]: ||w (f_e - f_e^q)|| / ||w f_e|| over tokens routed "
        f"to e (gate weights w, weights quantized to {', '.join(formats)}), sampled at most "
        f"{cap_factor:g}x the mean tokens per expert per batch."
    )
    if importance == "removal":
        text += " importance: mean calibration loss increase when the expert is dropped from its layer."
    return text
