"""EPMoE on 1, 2 and 4 ranks equals a dense single-process reference (fp32, weights rounded to bf16).

Every case runs in one spawn per world size (a module fixture); the tests then check one thing
each. Quantized plans give all copies of an expert one format, so the reference uses exactly the
dequantised weights the layer uses, whichever copy a token lands on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gloo import run_ranks
from rnq_ep.layer import EPMoE, LayerStats, SharedExperts, route_topk
from rnq_ep.quant import dequantize, quantize
from rnq_ep.runtime.inputs import random_layer_weights
from rnq_ep.specs import LayerPlan, Slot, load_model

MODEL = load_model("tiny")  # H 96, I 160, 8 experts, top-2
TOKENS = 24  # per rank
SEED = 3
NAN_ROWS = (1, 5)


def random_layer_plan(num_gpus: int, seed: int, formats: tuple[str, ...] = ("bf16",), replicas: int = 3) -> LayerPlan:
    """Each expert on a random GPU, `replicas` experts copied to another GPU; one format per expert."""
    rng = np.random.default_rng(seed)
    fmt_of_expert = rng.choice(formats, size=MODEL.num_experts)
    pairs = {(int(rng.integers(num_gpus)), e) for e in range(MODEL.num_experts)}
    for e in rng.choice(MODEL.num_experts, size=replicas, replace=False):
        free = [g for g in range(num_gpus) if (g, int(e)) not in pairs]
        if free:
            pairs.add((int(rng.choice(free)), int(e)))
    copies = np.bincount([e for _, e in pairs], minlength=MODEL.num_experts)
    slots = [Slot(gpu=g, expert=e, fmt=str(fmt_of_expert[e]), share=1.0 / copies[e]) for g, e in sorted(pairs)]
    return LayerPlan(layer=0, slots=slots)


def plain_ep_plan(num_gpus: int) -> LayerPlan:
    """Contiguous blocks of experts per GPU: tokens often pick two experts on one GPU (dedupe)."""
    per_gpu = -(-MODEL.num_experts // num_gpus)
    return LayerPlan(layer=0, slots=[Slot(gpu=e // per_gpu, expert=e, fmt="bf16", share=1.0) for e in range(MODEL.num_experts)])


def cases(world: int) -> dict[str, tuple[LayerPlan, str]]:
    """name -> (layer plan, routing policy); the same on every rank and in the parent."""
    return {
        "bf16-replicas": (random_layer_plan(world, seed=world), "least-loaded"),
        "quantized": (random_layer_plan(world, seed=10 + world, formats=("bf16", "int8", "int4")), "least-loaded"),
        "static": (random_layer_plan(world, seed=world), "static"),
        "hash": (random_layer_plan(world, seed=world), "hash"),
        "plain-ep": (plain_ep_plan(world), "least-loaded"),
        "nan": (random_layer_plan(world, seed=world), "least-loaded"),
    }


def tokens_of(rank: int, nan: bool = False) -> torch.Tensor:
    """This rank's tokens [TOKENS, H] fp32 (rank 0 gets NaN rows in the nan case)."""
    x = torch.randn(TOKENS, MODEL.hidden_size, generator=torch.Generator().manual_seed(100 + rank))
    if nan and rank == 0:
        x[list(NAN_ROWS), 7] = float("nan")
    return x


def run_cases(rank: int, world: int) -> dict[str, tuple[torch.Tensor, LayerStats]]:
    """Every case on this rank: name -> (output [TOKENS, H], last_stats)."""
    group = dist.group.WORLD if dist.is_initialized() else None
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    results = {}
    for name, (layer_plan, policy) in cases(world).items():
        layer = EPMoE(MODEL, layer_plan, world, rank, group, w_gate_up, w_down, router, policy=policy, backend="torch")
        out = layer(tokens_of(rank, nan=name == "nan"))
        results[name] = (out, layer.last_stats)
    return results


def dense_reference(x: torch.Tensor, layer_plan: LayerPlan) -> torch.Tensor:
    """Unsharded layer, one token and one k at a time, with each expert's dequantised weights."""
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    fmt_of_expert = {s.expert: s.fmt for s in layer_plan.slots}
    gate_up = [dequantize(quantize(w_gate_up[e], fmt_of_expert[e])) for e in range(MODEL.num_experts)]
    down = [dequantize(quantize(w_down[e], fmt_of_expert[e])) for e in range(MODEL.num_experts)]
    ids, weights = route_topk(x @ router.float().T, MODEL.top_k)
    inter = MODEL.moe_intermediate_size
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(MODEL.top_k):
            e = int(ids[t, j])
            projected = gate_up[e] @ x[t]  # [2I]
            hidden = torch.nn.functional.silu(projected[:inter]) * projected[inter:]
            out[t] += weights[t, j] * (down[e] @ hidden)
    return out


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def world_results(request) -> tuple[int, list[dict[str, tuple[torch.Tensor, LayerStats]]]]:
    """(world size, per-rank case results); world 1 runs in this process without a process group."""
    world = request.param
    return world, [run_cases(0, 1)] if world == 1 else run_ranks(run_cases, world)


def _check_against_reference(world_results, name: str) -> None:
    world, results = world_results
    out = torch.cat([results[rank][name][0] for rank in range(world)])
    x = torch.cat([tokens_of(rank) for rank in range(world)])
    torch.testing.assert_close(out, dense_reference(x, cases(world)[name][0]), rtol=1e-5, atol=1e-5)


def test_bf16_plan_with_replicas_equals_the_dense_reference(world_results):
    _check_against_reference(world_results, "bf16-replicas")


def test_quantized_copies_equal_the_reference_on_dequantised_weights(world_results):
    _check_against_reference(world_results, "quantized")


@pytest.mark.parametrize("policy", ["static", "hash"])
def test_every_routing_policy_gives_the_same_output(world_results, policy):
    _check_against_reference(world_results, policy)


def test_dedupe_sends_fewer_bytes_with_the_same_output(world_results):
    world, results = world_results
    _check_against_reference(world_results, "plain-ep")
    stats = [results[rank]["plain-ep"][1] for rank in range(world)]
    assert all(s.bytes_sent <= s.bytes_sent_no_dedupe for s in stats)
    if world > 1:
        assert sum(s.bytes_sent for s in stats) < sum(s.bytes_sent_no_dedupe for s in stats)


def test_stats_count_every_routed_row_once(world_results):
    world, results = world_results
    stats = [results[rank]["bf16-replicas"][1] for rank in range(world)]
    per_gpu = stats[0].tokens_per_gpu
    assert per_gpu.sum() == world * TOKENS * MODEL.top_k
    assert [s.tokens_per_copy.sum() for s in stats] == per_gpu.tolist()
    assert stats[0].balancedness == pytest.approx(per_gpu.max() / per_gpu.mean())


def test_nan_in_x_reaches_exactly_its_own_rows(world_results):
    world, results = world_results
    out = torch.cat([results[rank]["nan"][0] for rank in range(world)])
    nan_rows = torch.isnan(out).any(dim=1).nonzero().squeeze(1).tolist()
    assert nan_rows == list(NAN_ROWS)
    assert torch.isnan(out[list(NAN_ROWS)]).all()


def _layer(layer_plan: LayerPlan | None = None, num_gpus: int = 1, router=None, shared=None) -> EPMoE:
    """A world-1 layer (no process group) on the tiny model; the seeded gate matrix unless `router`."""
    w_gate_up, w_down, gate = random_layer_weights(MODEL, 0, SEED)
    layer_plan = layer_plan or random_layer_plan(num_gpus, seed=0)
    router = gate if router is None else router
    return EPMoE(MODEL, layer_plan, num_gpus, 0, None, w_gate_up, w_down, router, shared, backend="torch")


def test_plan_for_more_gpus_than_the_world_names_both():
    with pytest.raises(ValueError, match="the plan has 2 GPUs but the process group has world size 1"):
        _layer(random_layer_plan(2, seed=0), num_gpus=2)


def test_topk_ids_out_of_range_are_rejected():
    x = tokens_of(0)
    ids = torch.zeros(TOKENS, MODEL.top_k, dtype=torch.int64)
    ids[3, 1] = MODEL.num_experts
    with pytest.raises(ValueError, match="expert id 8 out of range for 8 experts"):
        _layer().forward_routed(x, ids, torch.full(ids.shape, 0.5))


def test_mismatched_hidden_size_is_rejected():
    with pytest.raises(ValueError, match="x has shape \\(24, 95\\), model 'tiny' expects \\[tokens, hidden_size=96\\]"):
        _layer()(tokens_of(0)[:, :95])


def test_expert_weights_of_the_wrong_shape_are_rejected():
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    with pytest.raises(ValueError, match="w_down has shape \\(8, 96, 159\\)"):
        EPMoE(MODEL, random_layer_plan(1, 0), 1, 0, None, w_gate_up, w_down[..., :159], router)


def test_a_router_callable_replaces_the_gate_matrix():
    _, _, gate = random_layer_weights(MODEL, 0, SEED)
    x = tokens_of(0)
    ids, weights = route_topk(x @ gate.float().T, MODEL.top_k)
    torch.testing.assert_close(_layer(router=lambda _: (ids, weights))(x), _layer()(x))


def test_shared_experts_are_added_to_the_routed_output():
    x = tokens_of(0)
    shared = torch.nn.Linear(MODEL.hidden_size, MODEL.hidden_size, bias=False)
    with torch.no_grad():
        torch.testing.assert_close(_layer(shared=shared)(x), _layer()(x) + shared(x))


def test_shared_experts_of_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"shared experts must be w_gate_up \[2I, H\] and w_down \[H, I\]"):
        SharedExperts(torch.zeros(2 * 16, MODEL.hidden_size), torch.zeros(MODEL.hidden_size, 15))


def test_switch_plan_routes_by_the_new_table_from_the_next_forward():
    x = tokens_of(0)
    layer = _layer(plain_ep_plan(1))
    layer(x)  # builds the first table's routing index
    reversed_plan = LayerPlan(layer=0, slots=[Slot(gpu=0, expert=e, fmt="int8", share=1.0)
                                              for e in reversed(range(MODEL.num_experts))])
    target = _layer(reversed_plan)
    layer.switch_plan(target.table, target.experts)
    torch.testing.assert_close(layer(x), target(x), rtol=0, atol=0)


def test_routed_counts_accumulate_each_forwards_top_k_ids():
    x = tokens_of(0)
    layer = _layer()
    layer.routed_counts = torch.zeros(MODEL.num_experts, dtype=torch.int64)
    ids, weights = route_topk(x @ random_layer_weights(MODEL, 0, SEED)[2].float().T, MODEL.top_k)
    layer.forward_routed(x, ids, weights)
    layer.forward_routed(x, ids, weights)
    assert torch.equal(layer.routed_counts, 2 * torch.bincount(ids.reshape(-1), minlength=MODEL.num_experts))
