"""Hedge copies: spare copies of quantized single-copy experts bought with the quality budget balancing left."""

from __future__ import annotations

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.balance import SlotTable, water_fill
from rnq_ep.bench.planner import SHIPPED_LOADS
from rnq_ep.memory import gpu_budget
from rnq_ep.metrics import score_plan
from rnq_ep.planner import plan_rnq
from rnq_ep.planner.hedge import hedge_copies, hedge_layers
from rnq_ep.planner.limits import Limits
from rnq_ep.specs import PlanOptions, load_cluster, load_model, load_stats

BF16, INT8 = 100, 51  # bytes of one expert: two int8 copies do not fit where one bf16 copy did, as with real scales


def limits_of(num_experts: int, per_gpu: int, token_budget: float, max_copies: int = 8) -> Limits:
    """Limits of a layer with room for `per_gpu` bf16 experts per GPU, bf16 and int8 allowed at unit cost."""
    cost = np.tile([0.0, 1.0, np.inf], (num_experts, 1))
    return Limits(
        budget=per_gpu * BF16, fmt_bytes=np.array([BF16, INT8, 26]), cost=cost, token_budget=token_budget,
        max_copies=max_copies, max_held=per_gpu * BF16 // INT8, gpus_per_node=8, prefer_node=False,
    )


def one_copy_each(tokens: list[float], quantized: list[int], num_gpus: int) -> tuple[np.ndarray, ...]:
    """Copies (gpu, expert, fmt, tokens) [E]: expert e alone on GPU e % num_gpus, int8 where listed."""
    num_experts = len(tokens)
    fmt = np.zeros(num_experts, dtype=np.int64)
    fmt[quantized] = 1
    return np.arange(num_experts) % num_gpus, np.arange(num_experts), fmt, np.array(tokens, dtype=np.float64)


def test_a_quantized_single_copy_expert_gets_a_token_free_copy_on_another_gpu():
    # GPU 0 holds experts 0, 2, 4 in bf16 (full); GPU 1 holds 1 (int8), 3, 5
    copies = one_copy_each([40.0, 10.0, 30.0, 5.0, 2.0, 60.0], quantized=[1], num_gpus=2)
    gpu, expert, fmt, tokens = hedge_copies(copies, limits_of(6, per_gpu=3, token_budget=42.0), num_gpus=2, reserve=0.0)
    assert gpu.size == 7
    assert (gpu[-1], expert[-1], fmt[-1], tokens[-1]) == (0, 1, 1, 0.0)
    assert fmt.tolist()[:6] == [0, 1, 1, 0, 1, 0], "GPU 0's two lightest bf16 copies (experts 4 and 2) make room"


def test_a_hedge_lets_the_router_relieve_the_gpu_of_an_expert_that_turns_hot():
    copies = one_copy_each([40.0, 10.0, 30.0, 5.0, 2.0, 60.0], quantized=[1], num_gpus=2)
    hedged = hedge_copies(copies, limits_of(6, per_gpu=3, token_budget=42.0), num_gpus=2, reserve=0.0)
    served = np.array([40, 200, 30, 5, 2, 60])  # expert 1 was cold when planned and is the hottest now

    def max_gpu_load(gpu, expert, fmt, tokens):
        table = SlotTable.from_arrays(gpu, expert, fmt.astype(np.int8), np.ones(gpu.size), 2, 6)
        return np.bincount(gpu, weights=water_fill(table, served), minlength=2).max()

    assert max_gpu_load(*copies) == 265  # GPU 1: experts 1, 3, 5
    assert max_gpu_load(*hedged) < 175  # expert 1's tokens split with GPU 0 (mean load 168.5)


def test_no_hedge_when_making_room_would_exceed_the_quality_budget():
    copies = one_copy_each([40.0, 10.0, 30.0, 5.0, 2.0, 60.0], quantized=[1], num_gpus=2)
    hedged = hedge_copies(copies, limits_of(6, per_gpu=3, token_budget=41.0), num_gpus=2, reserve=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(hedged, copies))


def test_bf16_single_copy_experts_are_not_hedged():
    copies = one_copy_each([40.0, 10.0, 30.0, 5.0, 2.0, 60.0], quantized=[], num_gpus=2)
    hedged = hedge_copies(copies, limits_of(6, per_gpu=3, token_budget=100.0), num_gpus=2, reserve=0.0)
    assert hedged[0].size == 6


def test_max_copies_one_allows_no_hedge():
    copies = one_copy_each([40.0, 10.0, 30.0, 5.0, 2.0, 60.0], quantized=[1], num_gpus=2)
    hedged = hedge_copies(copies, limits_of(6, per_gpu=3, token_budget=100.0, max_copies=1), num_gpus=2, reserve=0.0)
    assert hedged[0].size == 6


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    num_gpus=st.integers(2, 6),
    per_gpu=st.integers(1, 5),
    budget_share=st.floats(0.0, 0.6),
)
def test_hedges_keep_bytes_quality_budget_and_distinct_gpus(seed, num_gpus, per_gpu, budget_share):
    rng = np.random.default_rng(seed)
    num_experts = num_gpus * per_gpu
    tokens = rng.exponential(size=num_experts) * 100
    quantized = np.flatnonzero(rng.random(num_experts) < 0.3)
    copies = one_copy_each(tokens.tolist(), quantized.tolist(), num_gpus)
    token_budget = max(budget_share * tokens.sum(), tokens[quantized].sum())
    limits = limits_of(num_experts, per_gpu, token_budget)
    gpu, expert, fmt, planned = hedge_copies(copies, limits, num_gpus, reserve=0.0)
    old = copies[0].size
    assert np.bincount(gpu, weights=limits.fmt_bytes[fmt], minlength=num_gpus).max() <= limits.budget
    assert np.bincount(gpu, minlength=num_gpus).max() <= max(limits.max_held, per_gpu)
    assert planned[fmt > 0].sum() <= token_budget + 1e-9
    assert len(set(zip(gpu.tolist(), expert.tolist()))) == gpu.size, "no two copies of an expert on one GPU"
    assert len(set(gpu[old:].tolist())) == gpu.size - old, "at most one hedge per GPU"
    assert (planned[old:] == 0).all() and set(expert[old:].tolist()) <= set(quantized.tolist())
    assert np.array_equal(planned[:old], copies[3]) and (fmt[:old] >= copies[2]).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), num_gpus=st.integers(2, 5), per_gpu=st.integers(1, 4), num_layers=st.integers(1, 5))
def test_hedging_layers_together_hedges_each_as_alone(seed, num_gpus, per_gpu, num_layers):
    """One room_costs call for the layers that share costs, GPUs numbered apart; layers with costs of their
    own (calibrated sensitivities) or other budgets in their own group: each as hedge_copies alone."""
    rng = np.random.default_rng(seed)
    num_experts = num_gpus * per_gpu
    shared = limits_of(num_experts, per_gpu, 0.0)
    layers, limits = [], []
    for _ in range(num_layers):
        tokens = rng.exponential(size=num_experts) * 100
        quantized = np.flatnonzero(rng.random(num_experts) < 0.4)
        layers.append(one_copy_each(tokens.tolist(), quantized.tolist(), num_gpus))
        token_budget = max(rng.uniform(0.0, 0.6) * tokens.sum(), tokens[quantized].sum())
        own = rng.random() < 0.3  # its own cost matrix, as with per-layer sensitivities
        limits.append(limits_of(num_experts, per_gpu, token_budget) if own else shared.with_token_budget(token_budget))
    together = hedge_layers(layers, limits, num_gpus)
    for copies, layer_limits, hedged in zip(layers, limits, together):
        alone = hedge_copies(copies, layer_limits, num_gpus)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(hedged, alone))


def test_plan_rnq_adds_hedges_by_default_and_keeps_the_plan_valid():
    model, cluster = load_model("olmoe-1b-7b"), load_cluster("h100x8")
    loads = load_stats(SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json", model)
    plain, hedged = plan_rnq(model, cluster, loads, PlanOptions(hedge=False)), plan_rnq(model, cluster, loads, PlanOptions())
    copies = lambda plan: sum(len(layer.slots) for layer in plan.layers)  # noqa: E731
    assert PlanOptions().hedge is True
    assert copies(hedged) > copies(plain), "the arxiv plan leaves quality budget for spare copies"
    for layer in hedged.layers:
        held = [(s.gpu, s.expert) for s in layer.slots]
        assert len(set(held)) == len(held), "no two copies of an expert on one GPU"
        shares = np.bincount([s.expert for s in layer.slots], weights=[s.share for s in layer.slots],
                             minlength=model.num_experts)
        assert np.allclose(shares, 1.0)
    score = score_plan(hedged, loads)
    assert score.bytes_per_gpu.max() <= gpu_budget(model, cluster, PlanOptions())
    assert score.quantized_fraction.max() <= PlanOptions().quality_budget + 1e-9, "the in-sample guarantee holds"


def test_hedge_is_a_quiet_no_op_where_no_replica_and_no_hedge_fits(caplog):
    """At plain-EP memory bf16 only or a zero budget leaves no room for a replica, and max_copies 1 allows
    none: nothing to even out, nothing to hedge, and no warning about it (hedges are on by default)."""
    model, cluster = load_model("olmoe-1b-7b"), load_cluster("h100x8")
    loads = load_stats(SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json", model)
    for leaves_nothing in (PlanOptions(max_copies=1), PlanOptions(formats=("bf16",)), PlanOptions(quality_budget=0.0)):
        with caplog.at_level("WARNING", logger="rnq_ep"):
            plan = plan_rnq(model, cluster, loads, leaves_nothing)
        assert caplog.text == "" and plan.options.hedge
        unhedged = plan_rnq(model, cluster, loads, msgspec.structs.replace(leaves_nothing, hedge=False))
        assert plan == msgspec.structs.replace(unhedged, options=plan.options, summary=plan.summary)


def test_bf16_only_plans_with_room_for_replicas_still_even_their_singles():
    model, cluster = load_model("olmoe-1b-7b"), load_cluster("h100x8")
    loads = load_stats(SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json", model)
    roomy = PlanOptions(formats=("bf16",), memory_budget=gpu_budget(model, cluster, PlanOptions()) * 3 // 2)
    evened, plain = plan_rnq(model, cluster, loads, roomy), plan_rnq(model, cluster, loads, msgspec.structs.replace(roomy, hedge=False))
    spread = lambda plan: [singles_spread(layer, model.num_experts, cluster.num_gpus) for layer in plan.layers]  # noqa: E731
    assert all(a <= b for a, b in zip(spread(evened), spread(plain))) and spread(evened) != spread(plain)
    assert [len(a.slots) for a in evened.layers] == [len(b.slots) for b in plain.layers], "evening adds no copy"


def singles_spread(layer, num_experts: int, num_gpus: int) -> int:
    """Most minus fewest single-copy experts on one GPU in a LayerPlan."""
    experts = np.array([slot.expert for slot in layer.slots])
    alone = np.bincount(experts, minlength=num_experts)[experts] == 1
    per_gpu = np.bincount(np.array([slot.gpu for slot in layer.slots])[alone], minlength=num_gpus)
    return int(per_gpu.max() - per_gpu.min())
