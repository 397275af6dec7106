"""R&Q planner behaviour: balance on real loads, quality spending, derived arrays, bad inputs."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.balance import SlotTable, water_fill
from rnq_ep.memory import expert_bytes, plain_ep_budget
from rnq_ep.planner import InfeasiblePlan, plan_arrays, plan_plain_ep, plan_rnq
from rnq_ep.planner.eplb import replicate_experts
from rnq_ep.planner.place import copy_counts, replica_order
from rnq_ep.planner.routed import drop_until_within, routed_quantized, table_of
from rnq_ep.planner.quantize import cheapest_conversions, cheapest_conversions_by_gpu, sensitivity_costs
from rnq_ep.planner.replicate import TRIED_SINKS, _sink_order
from rnq_ep.specs import ClusterSpec, LoadStats, ModelSpec, PlanOptions, SpecError, load_cluster, load_model, load_stats

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "loads"


def olmoe():
    return load_model("olmoe-1b-7b"), load_cluster("h100x8"), load_stats(SHIPPED / "olmoe-1b-7b-0924_olmoe-repo_github.json")


def planned_gpu_loads(plan, loads) -> np.ndarray:
    """[L, G] tokens per GPU under the plan's shares."""
    out = np.zeros((len(plan.layers), plan.cluster.num_gpus))
    for i, (layer, counts) in enumerate(zip(plan.layers, loads.counts)):
        for slot in layer.slots:
            out[i, slot.gpu] += slot.share * counts[slot.expert]
    return out


def test_rnq_balances_real_olmoe_loads_at_plain_ep_memory():
    model, cluster, loads = olmoe()
    rnq = planned_gpu_loads(plan_rnq(model, cluster, loads, PlanOptions()), loads)
    plain = planned_gpu_loads(plan_plain_ep(model, cluster, loads), loads)
    assert (rnq.max(axis=1) / rnq.mean(axis=1)).max() <= 1.01
    assert (plain.max(axis=1) / plain.mean(axis=1)).min() > 1.2


def test_plan_layers_follow_the_load_files_layer_ids():
    model, cluster, loads = olmoe()
    assert [layer.layer for layer in plan_rnq(model, cluster, loads, PlanOptions()).layers] == [0, 7, 15]


def test_quality_budget_zero_keeps_every_copy_bf16():
    model, cluster, loads = olmoe()
    plan = plan_rnq(model, cluster, loads, PlanOptions(quality_budget=0.0))
    assert all(slot.fmt == "bf16" for layer in plan.layers for slot in layer.slots)


def test_sensitive_expert_is_not_quantized_when_others_can_be():
    model = ModelSpec(name="m", num_layers=1, num_experts=8, top_k=1, hidden_size=64, moe_intermediate_size=64)
    cluster = ClusterSpec(
        name="c2", nodes=1, gpus_per_node=2, hbm_bytes_per_s=1e12, peak_flops=1e15,
        intra_node_bytes_per_s=1e11, inter_node_bytes_per_s=1e11,
    )
    base = dict(counts=[[400, 10, 12, 9, 11, 10, 10, 10]], num_experts=8, top_k=1)
    fragile = [[{"int8": 100.0 if e == 3 else 1.0} for e in range(8)]]
    options = PlanOptions(quality_budget=0.1)

    def quantized(loads: LoadStats) -> set[int]:
        return {s.expert for s in plan_rnq(model, cluster, loads, options).layers[0].slots if s.fmt != "bf16"}

    assert 3 in quantized(LoadStats(**base))
    assert 3 not in quantized(LoadStats(**base, sensitivity=fragile))
    assert quantized(LoadStats(**base, sensitivity=fragile))


def test_cheapest_conversions_frees_bytes_from_the_cheapest_copies():
    fmt_bytes = np.array([100, 52, 28])
    cost = np.array([[0.0, 1.0, 4.0]] * 4)
    cost[0] = [0.0, 50.0, 200.0]
    new_fmt, _, tokens = cheapest_conversions(np.zeros(4, dtype=np.int64), np.array([10.0, 10, 30, 10]), cost, fmt_bytes, 90)
    assert new_fmt.tolist() == [0, 1, 0, 1]
    assert tokens == 20.0
    assert cheapest_conversions(np.zeros(2, dtype=np.int64), np.ones(2), cost[:2], fmt_bytes, 1000) is None


def test_plan_arrays_pad_uneven_gpus_and_agree_with_slots():
    model, cluster, loads = olmoe()
    plan = plan_rnq(model, cluster, loads, PlanOptions())
    phy2log, log2phy, logcnt = plan_arrays(plan)
    per_gpu = phy2log.shape[1] // cluster.num_gpus
    for i, layer in enumerate(plan.layers):
        held = np.bincount([s.gpu for s in layer.slots], minlength=cluster.num_gpus)
        for g in range(cluster.num_gpus):
            row = phy2log[i, g * per_gpu : (g + 1) * per_gpu]
            assert (row[: held[g]] >= 0).all() and (row[held[g] :] == -1).all()
        assert logcnt[i].tolist() == np.bincount([s.expert for s in layer.slots], minlength=64).tolist()
        for e in range(64):
            physical = log2phy[i, e][: logcnt[i, e]]
            assert (phy2log[i, physical] == e).all() and (log2phy[i, e][logcnt[i, e] :] == -1).all()


def test_budget_too_small_even_for_int4_names_gpus_and_missing_bytes():
    model, cluster, loads = olmoe()
    options = PlanOptions(formats=("bf16", "int8", "int4"), memory_budget=7 * expert_bytes(model, "int4"))
    with pytest.raises(InfeasiblePlan, match=r"GPUs 0\.\.7 of 8 .* int4 .* misses \d+ bytes"):
        plan_rnq(model, cluster, loads, options)


def test_budget_that_needs_more_quantization_than_quality_allows_names_gpus():
    model, cluster, loads = olmoe()
    options = PlanOptions(quality_budget=0.0, memory_budget=plain_ep_budget(model, 8) * 3 // 4)
    with pytest.raises(InfeasiblePlan, match=r"quality budget .* GPU \d+ \(\d+ bytes over"):
        plan_rnq(model, cluster, loads, options)


def test_loads_for_another_expert_count_are_rejected():
    model, cluster, _ = olmoe()
    with pytest.raises(SpecError, match="num_experts=8 but model"):
        plan_rnq(model, cluster, LoadStats(counts=[[1] * 8], num_experts=8, top_k=2), PlanOptions())


def test_more_gpus_than_experts_fills_gpus_with_replicas():
    model = ModelSpec(name="m", num_layers=1, num_experts=4, top_k=1, hidden_size=64, moe_intermediate_size=64)
    cluster = load_cluster("h100x8")
    loads = LoadStats(counts=[[100, 100, 100, 500]], num_experts=4, top_k=1)
    plan = plan_rnq(model, cluster, loads, PlanOptions())
    gpu_load = planned_gpu_loads(plan, loads)[0]
    assert gpu_load.max() == pytest.approx(gpu_load.mean())
    with pytest.raises(SpecError, match="8 GPUs"):
        plan_plain_ep(model, cluster, loads)


def test_cheapest_conversions_by_gpu_matches_one_gpu_at_a_time():
    rng = np.random.default_rng(5)
    fmt_bytes = np.array([100, 52, 28])
    gpu = rng.integers(0, 6, 40)
    tokens = rng.random(40) * 10
    cost = np.tile([0.0, 1.0, 4.0], (40, 1)) * rng.random((40, 1))
    need = np.array([0, 30, 150, 400, 2000, 60])
    together = cheapest_conversions_by_gpu(gpu, np.zeros(40, dtype=np.int64), tokens, cost, fmt_bytes, need)
    for g in range(6):
        mine = gpu == g
        alone = cheapest_conversions(np.zeros(mine.sum(), dtype=np.int64), tokens[mine], cost[mine], fmt_bytes, int(need[g]))
        expected = np.zeros(mine.sum(), dtype=np.int64) if alone is None else alone[0]
        assert together[mine].tolist() == expected.tolist(), f"GPU {g}"


def test_affinity_renames_gpus_to_keep_the_most_co_activated_tokens_in_place():
    model = ModelSpec(name="m", num_layers=2, num_experts=8, top_k=1, hidden_size=64, moe_intermediate_size=64)
    cluster = load_cluster("cpu4")
    for seed in range(4):
        rng = np.random.default_rng(seed)
        follows = rng.permutation(8)  # tokens of expert e in layer 0 go on to expert follows[e] in layer 1
        coactivation = [[[100 if b == follows[a] else 0 for b in range(8)] for a in range(8)]]
        loads = LoadStats(counts=rng.integers(50, 100, (2, 8)).tolist(), num_experts=8, top_k=1, coactivation=coactivation)

        def staying(plan, rename=range(4)) -> float:
            first, second = ({(s.gpu, s.expert): s.share for s in layer.slots} for layer in plan.layers)
            second = {(rename[g], e): share for (g, e), share in second.items()}
            return sum(share * second.get((g, int(follows[e])), 0.0) for (g, e), share in first.items())

        plain = plan_rnq(model, cluster, loads, PlanOptions(formats=("bf16",)))
        aligned = plan_rnq(model, cluster, loads, PlanOptions(formats=("bf16",), affinity_weight=1.0))
        best = max(staying(plain, rename) for rename in itertools.permutations(range(4)))
        assert staying(aligned) == pytest.approx(best)
        for before, after in zip(planned_gpu_loads(plain, loads), planned_gpu_loads(aligned, loads)):
            assert sorted(before) == pytest.approx(sorted(after))


def test_copy_counts_match_eplb_replication():
    rng = np.random.default_rng(2)
    for _ in range(20):
        weight = rng.integers(0, 6, 12).astype(np.float64) * rng.integers(1, 4)
        extra = int(rng.integers(0, 30))
        _, _, logcnt = replicate_experts(weight[None, :], 12 + extra)
        assert copy_counts(weight, extra, max_copies=64).tolist() == logcnt[0].tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 12), st.integers(0, 40), st.integers(1, 8), st.sampled_from((1.0, 0.7, 0.0)))
def test_every_prefix_of_the_replica_order_gives_the_copy_counts(seed, num_experts, most, max_copies, scale):
    rng = np.random.default_rng(seed)
    weight = rng.integers(0, 6, num_experts) * scale  # small ints: many ties; scale 0: no load at all
    ranked = replica_order(weight, most, max_copies)
    for extra in range(most + 1):
        expected = copy_counts(weight, extra, max_copies).tolist()
        assert (1 + np.bincount(ranked[:extra], minlength=num_experts)).tolist() == expected


def test_least_loaded_routing_keeps_quality_budget_on_olmoe_planning_loads():
    model, cluster, loads = olmoe()
    plan = plan_rnq(model, cluster, loads, PlanOptions())
    for layer, counts in zip(plan.layers, loads.counts):
        table = SlotTable.from_layer(layer, cluster.num_gpus, model.num_experts)
        quotas = water_fill(table, np.asarray(counts))
        assert quotas[table.fmt > 0].sum() <= 0.25 * sum(counts)


def test_dropping_quantized_copies_brings_routing_within_budget():
    # expert 0 (hot) has a bf16 copy on GPU 0 and an int8 copy on the idle GPU 1, which least-loaded routing fills
    copies = (np.array([0, 1, 0]), np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([90.0, 10.0, 0.0]))
    counts = np.array([100, 0])
    assert routed_quantized(table_of(copies, 2, 2), counts, 10.0)[0] == 50
    gpu, expert, fmt, tokens = drop_until_within(copies, counts, 10.0, 2)
    assert (fmt == 0).all() and tokens.tolist() == [100.0, 0.0]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 40), st.integers(1, 8), st.booleans())
def test_sink_order_is_the_head_of_a_full_stable_sort(seed, num_gpus, gpus_per_node, prefer_node):
    rng = np.random.default_rng(seed)
    load = rng.integers(0, 6, num_gpus).astype(np.float64)  # small ints: many ties
    held, max_held, open_below = rng.integers(0, 3, num_gpus), 2, 4.5
    holders = sorted(rng.choice(num_gpus, int(rng.integers(0, num_gpus)), replace=False).tolist())  # GPUs with the expert
    state = SimpleNamespace(
        loads=load.tolist(), held=held, open_below=open_below, gpus_of={0: holders},
        open=sorted((x, g) for g, x in enumerate(load.tolist()) if x < open_below and held[g] < max_held),
    )
    limits = SimpleNamespace(gpus_per_node=gpus_per_node, prefer_node=prefer_node, max_held=max_held)
    open_gpus = np.flatnonzero((load < open_below) & (held < max_held) & ~np.isin(np.arange(num_gpus), holders))
    source, target, want = int(rng.integers(num_gpus)), 4.0, float(rng.integers(0, 4))
    order = open_gpus[np.argsort(load[open_gpus], kind="stable")].tolist()
    if prefer_node:
        lead = [g for g in order if g // gpus_per_node == source // gpus_per_node and target - load[g] >= want]
        order = lead + [g for g in order if g not in lead]
    assert _sink_order(state, limits, 0, source, target, want) == order[:TRIED_SINKS]


def test_a_negative_removal_importance_costs_nothing_rather_than_counting_as_a_gain():
    loads = LoadStats(counts=[[5, 5, 5]], num_experts=3, top_k=1, importance=[[2.0, -1.7e-5, 0.0]])
    cost = sensitivity_costs(loads, 0, PlanOptions(formats=("bf16", "int8", "int4")))
    assert cost.min() == 0.0 and cost[1].tolist() == [0.0, 0.0, 0.0] and cost[0, 1] == 2.0
