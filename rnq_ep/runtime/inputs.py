"""What a worker runs on: seeded random expert weights (identical on every rank; each expert drawn on its own,
so a rank makes only its own copies) and batches whose routing follows a load file's distribution
(`make_batch`, drawn per (seed, rank, step))."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from rnq_ep.specs import LoadStats, ModelSpec, Plan, SpecError

Routing = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: expert ids, router weights [T, k]
Batch = tuple[torch.Tensor, Routing]  # hidden [T, H] and its routing
BatchSource = Callable[[int], Batch]  # step -> this rank's batch
# leading seed key of a layer's shared-expert draw: (seed, layer) seeds its routed experts and (seed, rank, step) a
# batch, so (seed, layer, 1) would replay rank `layer`'s step-1 batch; a tag above any seed, rank or layer cannot
SHARED_EXPERTS_KEY = 2**32 + 1
ROUTED_EXPERT_KEY = 2**32 + 2  # leading seed key of one routed expert's draw: (key, seed, layer, expert)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (same tuple, same seed, on every host)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seeded_expert(
    model: ModelSpec, layer: int, seed: int, expert: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded bf16 weights of one routed expert, fan-in scaled: gate_up [2I, H], down [H, I].

    Drawn from (seed, layer, expert) alone, so any rank makes expert e without the others; a GPU
    draws with its own generator, directly in bf16, so its weights differ from the CPU's.
    """
    draw = _seeded_draw(torch.device(device), ROUTED_EXPERT_KEY, seed, layer, expert)
    h, i = model.hidden_size, model.moe_intermediate_size
    return draw(2 * i, h, fan_in=h), draw(h, i, fan_in=i)


def seeded_experts(
    model: ModelSpec, layer: int, seed: int, device: torch.device | str = "cpu"
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """expert -> seeded_expert(...) of one layer: what EPMoE / LocalExperts take to build only a rank's own copies."""
    return functools.partial(seeded_expert, model, layer, seed, device=device)


def seeded_router(model: ModelSpec, layer: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded bf16 gate matrix [E, H] of one layer, fan-in scaled."""
    return _seeded_draw(torch.device(device), seed, layer)(model.num_experts, model.hidden_size, fan_in=model.hidden_size)


def random_layer_weights(
    model: ModelSpec, layer: int, seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded bf16 weights of one whole layer on `device`: w_gate_up [E, 2I, H], w_down [E, H, I], router [E, H].

    Expert e is seeded_expert(e), drawn one expert at a time into the bf16 stacks (no fp32 copy of
    the layer); a rank that needs only its own copies passes seeded_experts(...) instead.
    """
    e, h, i = model.num_experts, model.hidden_size, model.moe_intermediate_size
    w_gate_up = torch.empty(e, 2 * i, h, dtype=torch.bfloat16, device=device)
    w_down = torch.empty(e, h, i, dtype=torch.bfloat16, device=device)
    for expert in range(e):
        w_gate_up[expert], w_down[expert] = seeded_expert(model, layer, seed, expert, device)
    return w_gate_up, w_down, seeded_router(model, layer, seed, device)


def random_shared_experts(
    model: ModelSpec, layer: int, seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Seeded bf16 weights of one layer's S shared experts as one SwiGLU of width S*I: w_gate_up [2SI, H],
    w_down [H, SI] (gate rows first, as DeepSeek's shared MLP); None for a model without shared experts."""
    if model.num_shared_experts == 0:
        return None
    draw = _seeded_draw(torch.device(device), SHARED_EXPERTS_KEY, seed, layer)
    width, h = model.num_shared_experts * model.moe_intermediate_size, model.hidden_size
    return draw(2 * width, h, fan_in=h), draw(h, width, fan_in=width)


def _seeded_draw(device: torch.device, *keys: int) -> Callable[..., torch.Tensor]:
    """draw(*shape, fan_in) -> bf16 normal weights scaled by fan_in^-0.5, from one generator seeded by `keys`."""
    gen = torch.Generator(device=device).manual_seed(derive_seed(*keys))
    draw_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def draw(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=draw_dtype) * fan_in**-0.5).to(torch.bfloat16)

    return draw


def inclusion_probabilities(counts: np.ndarray, top_k: int) -> np.ndarray:
    """Probability [E] that a token picks each expert: top_k * counts / sum, capped at 1 (sums to top_k)."""
    counts = np.asarray(counts, np.float64)
    if len(counts) < top_k:
        raise SpecError(f"cannot draw top-{top_k} distinct experts out of {len(counts)}")
    prob = np.zeros_like(counts)
    capped = np.zeros(len(counts), dtype=bool)
    for _ in range(len(counts)):  # each pass caps at least one more expert, or stops
        free_mass = counts * ~capped
        if free_mass.sum() == 0:  # fewer experts with tokens than top_k: spread the rest evenly
            free_mass = (~capped).astype(np.float64)
        prob = np.where(capped, 1.0, (top_k - capped.sum()) * free_mass / free_mass.sum())
        if (prob <= 1.0).all():
            break
        capped |= prob > 1.0
    return prob


def draw_routing(counts: np.ndarray, tokens: int, top_k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, top_k distinct experts, expert e with probability inclusion_probabilities(counts)[e]: ids, weights [T, k].

    Systematic sampling over a random expert order per token: the cumulative probabilities tile
    (0, k]; the points u, u+1, ..., u+k-1 land in k different experts (each probability <= 1), so
    every expert's expected count matches the load file exactly, heavy ones included.
    """
    prob = torch.as_tensor(inclusion_probabilities(counts, top_k))  # [E] float64
    order = torch.argsort(torch.rand(tokens, len(prob), generator=gen), dim=1)  # [T, E] random permutation
    cumulative = prob[order].cumsum(dim=1)  # [T, E], ends at k
    cumulative[:, -1] = top_k  # exact end, so rounding cannot drop the last point
    points = (1.0 - torch.rand(tokens, 1, generator=gen, dtype=torch.float64)) + torch.arange(top_k)  # [T, k] in (0, k]
    picked = torch.searchsorted(cumulative, points).clamp(max=len(prob) - 1)  # [T, k] positions in the order
    ids = order.gather(1, picked)  # [T, k]
    weights = torch.softmax(torch.randn(tokens, top_k, generator=gen), dim=-1)  # [T, k] fp32
    return ids, weights


def layer_counts(plan: Plan, stats: LoadStats | None) -> list[np.ndarray]:
    """Per plan layer, the expert counts [E] to draw routing from (uniform without a load file)."""
    num_experts = plan.model.num_experts
    if stats is None:
        return [np.ones(num_experts) for _ in plan.layers]
    if stats.num_experts != num_experts:
        raise SpecError(f"loads: num_experts={stats.num_experts} but the plan's model has {num_experts}")
    rows = {layer_id: row for layer_id, row in zip(stats.layers, stats.counts)}
    if all(layer.layer in rows for layer in plan.layers):
        return [np.asarray(rows[layer.layer], np.float64) for layer in plan.layers]
    if len(stats.counts) == len(plan.layers):
        return [np.asarray(row, np.float64) for row in stats.counts]
    raise SpecError(
        f"loads: has layers {stats.layers}, the plan has layers {[layer.layer for layer in plan.layers]}; "
        "expected the same layer ids or the same number of layers"
    )


def checkpoint_loader(
    model: ModelSpec, layer: int, seed: int, device: torch.device
) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Expert e's full (gate_up [2I, H], down [H, I]) of one layer, as a migration reloads it from the checkpoint:
    drawn alone on `device` each call, as a real checkpoint loader reads one expert."""
    return seeded_experts(model, layer, seed, device)


def make_batch(model: ModelSpec, counts: list[np.ndarray], tokens: int, seed: int, rank: int, step: int) -> Batch:
    """This rank's tokens [T, H] fp32 and, per layer, routing (ids, weights) [T, k]; seeded by (seed, rank, step)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, rank, step))
    hidden = torch.randn(tokens, model.hidden_size, generator=gen)  # [T, H]
    return hidden, [draw_routing(c, tokens, model.top_k, gen) for c in counts]
