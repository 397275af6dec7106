"""R&Q planner invariants as hypothesis properties over random models, clusters, loads and options."""

from __future__ import annotations

import math

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnq_ep.balance import SlotTable, water_fill
from rnq_ep.memory import expert_bytes, gpu_budget, plain_ep_budget
from rnq_ep.planner import InfeasiblePlan, plan_rnq
from rnq_ep.specs import ClusterSpec, LoadStats, ModelSpec, Plan, PlanOptions

FORMAT_SETS = [("bf16",), ("bf16", "int8"), ("bf16", "int4"), ("bf16", "int8", "int4")]


@st.composite
def planning_problems(draw):
    num_experts = draw(st.integers(2, 24))
    model = ModelSpec(
        name="rand",
        num_layers=3,
        num_experts=num_experts,
        top_k=draw(st.integers(1, min(4, num_experts))),
        hidden_size=draw(st.sampled_from([64, 96, 200])),
        moe_intermediate_size=draw(st.sampled_from([32, 160, 256])),
    )
    cluster = ClusterSpec(
        name="rand",
        nodes=draw(st.integers(1, 3)),
        gpus_per_node=draw(st.integers(1, 4)),
        hbm_bytes_per_s=1e12,
        peak_flops=1e15,
        intra_node_bytes_per_s=4e11,
        inter_node_bytes_per_s=draw(st.sampled_from([5e10, 4e11])),
    )
    num_layers = draw(st.integers(1, 3))
    skew = draw(st.floats(0.0, 2.0))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    counts = np.floor(rng.lognormal(0.0, skew, (num_layers, num_experts)) * draw(st.sampled_from([0, 3, 100, 5000])))
    loads = LoadStats(counts=counts.astype(int).tolist(), num_experts=num_experts, top_k=model.top_k, layer_ids=[7 + 2 * i for i in range(num_layers)])
    budget_scale = draw(st.sampled_from([None, 0.3, 0.6, 1.0, 1.5]))
    budget = None if budget_scale is None else max(1, int(plain_ep_budget(model, cluster.num_gpus) * budget_scale))
    options = PlanOptions(
        formats=draw(st.sampled_from(FORMAT_SETS)),
        quality_budget=draw(st.sampled_from([0.0, 0.1, 0.25, 1.0])),
        max_copies=draw(st.integers(0, 4)),
        memory_budget=budget,
        hedge=draw(st.booleans()),
    )
    return model, cluster, loads, options


def check_invariants(plan: Plan, loads: LoadStats) -> None:
    model, cluster, options = plan.model, plan.cluster, plan.options
    budget = gpu_budget(model, cluster, options)
    max_copies = min(cluster.num_gpus, options.max_copies or cluster.num_gpus)
    assert [layer.layer for layer in plan.layers] == loads.layers
    for layer, counts in zip(plan.layers, loads.counts):
        gpu = np.array([s.gpu for s in layer.slots])
        expert = np.array([s.expert for s in layer.slots])
        share = np.array([s.share for s in layer.slots])
        assert (np.diff(gpu) >= 0).all(), "slots ordered by gpu"
        assert ((gpu >= 0) & (gpu < cluster.num_gpus)).all()
        copies = np.bincount(expert, minlength=model.num_experts)
        assert (copies >= 1).all(), "every expert has a copy"
        assert copies.max() <= max_copies
        assert len(set(zip(gpu.tolist(), expert.tolist()))) == len(layer.slots), "no two copies of an expert on a GPU"
        assert (share >= 0).all()
        np.testing.assert_allclose(np.bincount(expert, weights=share, minlength=model.num_experts), 1.0, atol=1e-9)
        held = np.zeros(cluster.num_gpus, dtype=np.int64)
        quantized = 0.0
        for slot in layer.slots:
            assert slot.fmt in options.formats
            held[slot.gpu] += expert_bytes(model, slot.fmt)
            if slot.fmt != "bf16":
                quantized += slot.share * counts[slot.expert]
        assert held.max() <= budget, f"GPU over budget: {held.max()} > {budget}"
        assert quantized <= options.quality_budget * sum(counts) + 1e-6 * max(sum(counts), 1)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_problems())
def test_rnq_plan_satisfies_invariants_or_says_why_not(problem):
    model, cluster, loads, options = problem
    try:
        plan = plan_rnq(model, cluster, loads, options)
    except InfeasiblePlan as err:
        assert "GPU" in str(err) and "bytes" in str(err)
        return
    check_invariants(plan, loads)


@settings(max_examples=40, deadline=None)
@given(planning_problems())
def test_bf16_only_at_plain_ep_budget_gives_plain_ep_sized_plan(problem):
    model, cluster, loads, _ = problem
    if cluster.num_gpus > model.num_experts:
        return
    options = PlanOptions(formats=("bf16",), quality_budget=0.0, memory_budget=plain_ep_budget(model, cluster.num_gpus))
    plan = plan_rnq(model, cluster, loads, options)
    check_invariants(plan, loads)
    per_gpu = math.ceil(model.num_experts / cluster.num_gpus)
    for layer in plan.layers:
        assert np.bincount([s.gpu for s in layer.slots]).max() <= per_gpu
        assert all(s.fmt == "bf16" for s in layer.slots)


@settings(max_examples=40, deadline=None)
@given(planning_problems())
def test_feasible_whenever_one_copy_of_each_expert_fits_in_bf16(problem):
    model, cluster, loads, options = problem
    options = PlanOptions(formats=options.formats, quality_budget=options.quality_budget, max_copies=options.max_copies)
    check_invariants(plan_rnq(model, cluster, loads, options), loads)


@settings(max_examples=15, deadline=None)
@given(planning_problems())
def test_refined_plan_satisfies_invariants(problem):
    model, cluster, loads, options = problem
    refined = msgspec.structs.replace(options, refine=True, refine_time_limit=0.2)
    try:
        plan = plan_rnq(model, cluster, loads, refined)
    except InfeasiblePlan:
        return
    check_invariants(plan, loads)


@settings(max_examples=40, deadline=None)
@given(planning_problems())
def test_feasible_whenever_one_copy_of_each_expert_fits_in_the_smallest_format(problem):
    model, cluster, loads, options = problem
    smallest = min(expert_bytes(model, fmt) for fmt in options.formats)
    budget = math.ceil(model.num_experts / cluster.num_gpus) * smallest
    roomy = PlanOptions(formats=options.formats, quality_budget=1.0, max_copies=options.max_copies, memory_budget=budget)
    check_invariants(plan_rnq(model, cluster, loads, roomy), loads)


def routed_quantized_fraction(plan: Plan, loads: LoadStats) -> list[float]:
    """Per layer, the share of the planning loads that least-loaded routing (water_fill) sends to quantized copies."""
    fractions = []
    for layer, counts in zip(plan.layers, loads.counts):
        table = SlotTable.from_layer(layer, plan.cluster.num_gpus, plan.model.num_experts)
        quotas = water_fill(table, np.asarray(counts))
        fractions.append(float(quotas[table.fmt > 0].sum()) / max(sum(counts), 1))
    return fractions


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_problems())
def test_least_loaded_routing_of_planning_loads_keeps_quality_budget(problem):
    model, cluster, loads, options = problem
    try:
        plan = plan_rnq(model, cluster, loads, options)
    except InfeasiblePlan:
        return
    for fraction in routed_quantized_fraction(plan, loads):
        assert fraction <= options.quality_budget + 1e-9
