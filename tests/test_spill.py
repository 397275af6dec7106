"""SpillMoE on 2 and 4 gloo ranks: LLEP and R&Q + int8/int4 spill equal a dense single-process reference.

Every case runs in one spawn per world size (a module fixture). Tokens are skewed onto experts 0-2
(GPU 0's) and LLEP's chunk is 1 token (the ranks hold 24 tokens each), so every skewed case spills.
The reference runs each (token, k) through the weights of the copy that served it, dequantised in
that copy's format: bf16 for LLEP's spilled copies, the spill format (or the source's) for the rest.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from gloo import count_collectives, run_ranks
from rnq_ep.balance import SlotTable, gpu_loads, share_quotas
from rnq_ep.memory import expert_bytes
from rnq_ep.policies import Step, llep_spill
from rnq_ep.quant import dequantize, quantize
from rnq_ep.routing import route
from rnq_ep.runtime.inputs import random_layer_weights
from rnq_ep.spill import SpillMoE, peer_moves, quota_table
from rnq_ep.specs import FORMATS, LayerPlan, Slot, load_model

MODEL = load_model("tiny")  # H 96, I 160, 8 experts, top-2
TOKENS = 24  # per rank
SEED = 5


def plain_ep(world: int) -> LayerPlan:
    """Contiguous blocks of bf16 experts per GPU."""
    per_gpu = MODEL.num_experts // world
    return LayerPlan(layer=0, slots=[Slot(gpu=e // per_gpu, expert=e, fmt="bf16", share=1.0) for e in range(MODEL.num_experts)])


def replicated(world: int) -> LayerPlan:
    """Plain EP plus a second copy of a cold expert (7) on GPU 0, odd experts stored int8: replicas that do not help."""
    per_gpu = MODEL.num_experts // world
    slots = [(e // per_gpu, e) for e in range(MODEL.num_experts)] + [(0, MODEL.num_experts - 1)]
    copies = np.bincount([e for _, e in slots])
    return LayerPlan(layer=0, slots=[Slot(gpu=g, expert=e, fmt="int8" if e % 2 else "bf16", share=1.0 / copies[e])
                                     for g, e in sorted(slots)])


CASES = {  # name -> (plan of a world size, routing before spilling, spill format, skewed tokens)
    "llep": (plain_ep, "static", "bf16", True),
    "int8-spill": (plain_ep, "static", "int8", True),
    "rnq-int4-spill": (replicated, "least-loaded", "int4", True),
    "balanced": (plain_ep, "static", "bf16", False),
}


def routing_of(rank: int, skewed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (ids, weights) [TOKENS, 2]: mostly experts 0, 1, 2 (0 the hottest) when skewed, every expert equally
    otherwise."""
    gen = torch.Generator().manual_seed(200 + rank)
    t = torch.arange(TOKENS)
    ids = torch.stack([t % MODEL.num_experts, (t + 1) % MODEL.num_experts], dim=1)  # [T, 2], each expert 2T/E times
    if skewed:
        draw = torch.rand(TOKENS, generator=gen)
        ids[draw < 0.5] = torch.tensor([0, 1])
        ids[(draw >= 0.5) & (draw < 0.7)] = torch.tensor([0, 2])
    return ids, torch.softmax(torch.randn(TOKENS, 2, generator=gen), dim=-1)


def tokens_of(rank: int) -> torch.Tensor:
    """This rank's tokens [TOKENS, H] fp32."""
    return torch.randn(TOKENS, MODEL.hidden_size, generator=torch.Generator().manual_seed(100 + rank))


def global_counts(world: int, skewed: bool) -> np.ndarray:
    """Every rank's per-expert counts [R, E]."""
    return np.stack([np.bincount(routing_of(r, skewed)[0].reshape(-1).numpy(), minlength=MODEL.num_experts)
                     for r in range(world)])


def run_cases(rank: int, world: int) -> dict:
    """Every case on this rank: name -> (output, last_stats, last_spill, format served per (token, k) [T, 2])."""
    group = dist.group.WORLD
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    results = {}
    for name, (plan_of, policy, spill_fmt, skewed) in CASES.items():
        layer = SpillMoE(MODEL, plan_of(world), world, rank, group, w_gate_up, w_down, router, policy=policy,
                         backend="torch", spill_fmt=spill_fmt, min_chunk=1)
        ids, weights = routing_of(rank, skewed)
        out = layer.forward_routed(tokens_of(rank), ids, weights)
        spill = layer.last_spill
        table, routed_by = (quota_table(spill.step), "static") if spill.changed else (layer.table, policy)
        slots = route(global_counts(world, skewed), table, ids, rank, routed_by)
        results[name] = (out, layer.last_stats, spill, torch.as_tensor(table.fmt[slots.numpy()]))
    return results


def bad_ids(rank: int, world: int) -> str:
    """Rank 0 routes to an expert that does not exist; every rank's error message."""
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    layer = SpillMoE(MODEL, plain_ep(world), world, rank, dist.group.WORLD, w_gate_up, w_down, router,
                     policy="static", backend="torch", min_chunk=1)
    ids, weights = routing_of(rank, skewed=True)
    if rank == 0:
        ids[3, 0] = MODEL.num_experts
    try:
        layer.forward_routed(tokens_of(rank), ids, weights)
    except ValueError as err:
        return str(err)
    return ""


def collectives_by_case(rank: int, world: int) -> dict[str, dict[str, int]]:
    """Collectives of one step of an LLEP layer that spills (skewed) and of one that does not (even loads)."""
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    layer = SpillMoE(MODEL, plain_ep(world), world, rank, dist.group.WORLD, w_gate_up, w_down, router,
                     policy="static", backend="torch", min_chunk=1)
    out = {}
    for name, skewed in (("spills", True), ("stays", False)):
        ids, weights = routing_of(rank, skewed)
        out[name] = count_collectives(lambda: layer.forward_routed(tokens_of(rank), ids, weights))
        assert (layer.last_stats.spilled_copies > 0) == skewed
    return out


def reference(world: int, skewed: bool, fmt_served: list[torch.Tensor]) -> torch.Tensor:
    """Dense layer over all ranks' tokens, each (token, k) through its expert dequantised from the format that served it."""
    w_gate_up, w_down, _ = random_layer_weights(MODEL, 0, SEED)
    inter = MODEL.moe_intermediate_size
    outs = []
    for rank in range(world):
        x, (ids, weights), fmts = tokens_of(rank), routing_of(rank, skewed), fmt_served[rank]
        out = torch.zeros_like(x)
        for t in range(TOKENS):
            for j in range(MODEL.top_k):
                e, fmt = int(ids[t, j]), FORMATS[int(fmts[t, j])]
                projected = dequantize(quantize(w_gate_up[e], fmt)) @ x[t]  # [2I]
                hidden = torch.nn.functional.silu(projected[:inter]) * projected[inter:]
                out[t] += weights[t, j] * (dequantize(quantize(w_down[e], fmt)) @ hidden)
        outs.append(out)
    return torch.cat(outs)


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)])
def world_results(request) -> tuple[int, list[dict]]:
    """(world size, per-rank case results)."""
    return request.param, run_ranks(run_cases, request.param)


def _check_against_reference(world_results, name: str) -> None:
    world, results = world_results
    out = torch.cat([results[rank][name][0] for rank in range(world)])
    expected = reference(world, CASES[name][3], [results[rank][name][3] for rank in range(world)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_llep_spill_equals_the_dense_reference_and_moves_bf16_copies(world_results):
    world, results = world_results
    _check_against_reference(world_results, "llep")
    step = results[0]["llep"][2].step
    assert step.moves and all(fmt == "bf16" for _, _, fmt in step.moves)


@pytest.mark.parametrize("name", ["int8-spill", "rnq-int4-spill"])
def test_quantized_spill_equals_the_reference_on_the_spilled_copies_dequantised_weights(world_results, name):
    world, results = world_results
    _check_against_reference(world_results, name)
    spilled_fmts = {int(f) for rank in range(world) for f in results[rank][name][3].reshape(-1)}
    assert FORMATS.index(CASES[name][2]) in spilled_fmts  # some tokens were served by a quantized spilled copy


def test_every_rank_computes_the_same_step(world_results):
    world, results = world_results
    for name in CASES:
        steps = [results[rank][name][2].step for rank in range(world)]
        for step in steps[1:]:
            for column in ("gpu", "expert", "fmt", "share"):
                np.testing.assert_array_equal(getattr(step.table, column), getattr(steps[0].table, column))
            np.testing.assert_array_equal(step.quotas, steps[0].quotas)
            assert step.moves == steps[0].moves


def test_a_step_under_the_threshold_moves_nothing_and_equals_the_reference(world_results):
    world, results = world_results
    _check_against_reference(world_results, "balanced")
    for rank in range(world):
        _, stats, spill, _ = results[rank]["balanced"]
        assert not spill.changed and not spill.step.moves
        assert (stats.spilled_copies, stats.moved_bytes, stats.received_bytes) == (0, 0, 0)


def test_tokens_per_gpu_equal_the_steps_loads(world_results):
    world, results = world_results
    for name in CASES:
        for rank in range(world):
            _, stats, spill, _ = results[rank][name]
            np.testing.assert_array_equal(stats.tokens_per_gpu, gpu_loads(spill.step.table, spill.step.quotas))


def test_moved_bytes_are_the_steps_moves_times_expert_bytes_of_their_format(world_results):
    world, results = world_results
    for name in CASES:
        step = results[0][name][2].step
        expected = sum(expert_bytes(MODEL, fmt) for _, _, fmt in step.moves)
        assert all(results[rank][name][1].moved_bytes == expected for rank in range(world))
        assert sum(results[rank][name][1].received_bytes for rank in range(world)) == expected
        assert results[0][name][1].spilled_copies == len(step.moves)


@pytest.mark.slow
def test_a_step_makes_one_counts_all_gather_and_a_spilling_one_adds_only_the_weight_exchange_and_its_vote():
    for by_case in run_ranks(collectives_by_case, 2):
        assert by_case["stays"] == {"all_gather": 1, "all_to_all_single": 3}  # as eager EPMoE: counts, sizes, rows, back
        # exact transport on the spilled table: row counts, rows, rows back; then the weights and their vote
        assert by_case["spills"] == {"all_gather": 1, "all_to_all_single": 4, "all_reduce": 1}


def test_bad_expert_ids_on_one_rank_raise_on_every_rank():
    errors = run_ranks(bad_ids, 2)
    assert "expert id 8 out of range" in errors[0]
    assert "rejected their inputs" in errors[1]


def test_an_unknown_spill_format_is_rejected():
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    with pytest.raises(ValueError, match="spill_fmt 'fp8'"):
        SpillMoE(MODEL, plain_ep(1), 1, 0, None, w_gate_up, w_down, router, spill_fmt="fp8")


def test_a_gpt_oss_layer_is_refused_rather_than_spilled_without_its_biases():
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    with pytest.raises(NotImplementedError, match="spilling a layer with activation 'swiglu-oai'"):
        SpillMoE(MODEL, plain_ep(1), 1, 0, None, w_gate_up, w_down, router, backend="torch", activation="swiglu-oai")


def _table(gpu, expert, fmt) -> SlotTable:
    copies = np.bincount(expert)
    return SlotTable.from_arrays(np.array(gpu), np.array(expert), np.array(fmt, np.int8), 1.0 / copies[expert], 2, 2)


@pytest.mark.parametrize(("counts", "sent"), [([6000, 1000], (0, "int4")), ([1000, 6000], (1, "int8"))])
def test_a_bf16_source_is_sent_in_the_spill_format_and_a_quantized_one_as_it_is_stored(counts, sent):
    table = _table([0, 0], [0, 1], [0, 1])  # GPU 0: expert 0 bf16, expert 1 int8; GPU 1 idle
    step = llep_spill(table, np.array(counts), spill_fmt="int4")
    expert, fmt = sent
    assert step.moves == ((0, 1, fmt),) and step.table.fmt.tolist() == [0, 1, FORMATS.index(fmt)]
    assert [(m.slot, m.expert, m.src_slot, m.fmt, m.kind) for m in peer_moves(table, step)] == [(2, expert, expert, fmt, "peer")]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_static_routing_on_quota_shares_gives_back_exactly_the_quotas(data):
    num_experts = data.draw(st.integers(1, 6))
    expert = np.array(list(range(num_experts)) + data.draw(st.lists(st.integers(0, num_experts - 1), max_size=8)))
    gpu = np.array(data.draw(st.lists(st.integers(0, 3), min_size=len(expert), max_size=len(expert))))
    quotas = np.array(data.draw(st.lists(st.integers(0, 10**6), min_size=len(expert), max_size=len(expert))))
    copies = np.bincount(expert)
    table = SlotTable.from_arrays(gpu, expert, np.zeros(len(expert), np.int8), 1.0 / copies[expert], 4, num_experts)
    counts = np.bincount(expert, weights=quotas, minlength=num_experts).astype(np.int64)
    np.testing.assert_array_equal(share_quotas(quota_table(Step(table, quotas)), counts), quotas)


def failing_pack(rank: int, world: int) -> tuple[torch.Tensor, bool, int]:
    """LLEP's skewed case with rank 0 unable to pack its copies: (output, spilled?, bytes moved)."""
    import rnq_ep.spill

    def broken(*args, **kwargs):
        raise RuntimeError("packing failed")

    if rank == 0:
        rnq_ep.spill.pack_copies = broken
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    layer = SpillMoE(MODEL, plain_ep(world), world, rank, dist.group.WORLD, w_gate_up, w_down, router,
                     policy="static", backend="torch", min_chunk=1)
    out = layer.forward_routed(tokens_of(rank), *routing_of(rank, skewed=True))
    return out, layer.last_spill is not None, layer.last_stats.moved_bytes


@pytest.mark.slow
def test_a_rank_that_cannot_pack_makes_every_rank_run_the_step_unspilled():
    results = run_ranks(failing_pack, 2)
    assert [(spilled, moved) for _, spilled, moved in results] == [(False, 0), (False, 0)]
    out = torch.cat([out for out, _, _ in results])
    bf16 = [torch.zeros(TOKENS, MODEL.top_k, dtype=torch.int64)] * 2
    torch.testing.assert_close(out, reference(2, True, bf16), rtol=1e-5, atol=1e-5)
