"""EPLB-equivalent baseline and plain EP: DeepSeek's published example, slot counts, shares, errors."""

from __future__ import annotations

import numpy as np
import pytest

from rnq_ep.memory import expert_bytes
from rnq_ep.planner import InfeasiblePlan, export_sglang, plan_arrays, plan_eplb, plan_plain_ep, rebalance_experts
from rnq_ep.specs import ClusterSpec, LoadStats, ModelSpec, PlanOptions, SpecError

GOLDEN_WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
GOLDEN_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1], [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
GOLDEN_LOGCNT = [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


def make_model(num_experts: int = 12) -> ModelSpec:
    return ModelSpec(name="m", num_layers=2, num_experts=num_experts, top_k=2, hidden_size=64, moe_intermediate_size=96)


def make_cluster(nodes: int = 2, gpus_per_node: int = 4, budget: int | str = "plain-ep") -> ClusterSpec:
    return ClusterSpec(
        name="c",
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        hbm_bytes_per_s=1e12,
        peak_flops=1e15,
        intra_node_bytes_per_s=4e11,
        inter_node_bytes_per_s=5e10,
        expert_memory_budget=budget,
    )


def golden_loads() -> LoadStats:
    return LoadStats(counts=GOLDEN_WEIGHT, num_experts=12, top_k=2)


def test_rebalance_experts_reproduces_deepseek_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(np.array(GOLDEN_WEIGHT), 16, 4, 2, 8)
    assert phy2log.tolist() == GOLDEN_PHY2LOG
    assert logcnt.tolist() == GOLDEN_LOGCNT
    for layer in range(2):
        for expert in range(12):
            physical = log2phy[layer, expert][log2phy[layer, expert] >= 0]
            assert len(physical) == logcnt[layer, expert]
            assert (phy2log[layer, physical] == expert).all()


def test_rebalance_experts_global_policy_when_groups_do_not_divide_nodes():
    phy2log, _, logcnt = rebalance_experts(np.array(GOLDEN_WEIGHT), 16, 3, 2, 8)
    assert logcnt.sum(axis=1).tolist() == [16, 16]
    assert (np.sort(np.unique(phy2log[0])) == np.arange(12)).all()


def test_rebalance_experts_rejects_replicas_not_multiple_of_gpus():
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        rebalance_experts(np.array(GOLDEN_WEIGHT), 15, 4, 2, 8)


def test_plan_eplb_arrays_match_rebalance_experts_with_groups():
    model, cluster = make_model(), make_cluster(budget=2 * expert_bytes(make_model(), "bf16"))
    plan = plan_eplb(model, cluster, golden_loads(), num_groups=4)
    phy2log, _, logcnt = plan_arrays(plan)
    assert phy2log.tolist() == GOLDEN_PHY2LOG
    assert logcnt.tolist() == GOLDEN_LOGCNT


def test_plan_eplb_shares_are_equal_split():
    plan = plan_eplb(make_model(), make_cluster(budget=2 * expert_bytes(make_model(), "bf16")), golden_loads())
    for layer in plan.layers:
        copies = np.bincount([s.expert for s in layer.slots], minlength=12)
        for slot in layer.slots:
            assert slot.share == pytest.approx(1.0 / copies[slot.expert])
            assert slot.fmt == "bf16"


def test_plan_eplb_extra_memory_adds_slots_per_gpu():
    model = make_model(16)
    loads = LoadStats(counts=[list(range(1, 17))], num_experts=16, top_k=2)
    cluster = make_cluster(1, 2)  # plain EP: 8 experts per GPU
    assert all(len(layer.slots) == 16 for layer in plan_eplb(model, cluster, loads).layers)
    assert all(len(layer.slots) == 18 for layer in plan_eplb(model, cluster, loads, extra_memory=0.125).layers)


def test_plan_eplb_never_puts_two_copies_of_an_expert_on_one_gpu():
    rng = np.random.default_rng(0)  # raw EPLB puts 3 duplicate copies on GPUs here, none > 8 copies
    counts = (rng.lognormal(0, 1, (4, 16)) * 100).astype(int)
    raw_phy2log, _, _ = rebalance_experts(counts, 24, 1, 1, 8)
    assert sum(len(gpu) - len(set(gpu)) for gpu in raw_phy2log.reshape(-1, 3).tolist()) > 0
    loads = LoadStats(counts=counts.tolist(), num_experts=16, top_k=2)
    plan = plan_eplb(make_model(16), make_cluster(2, 4), loads, extra_memory=0.5)
    for layer in plan.layers:
        pairs = [(s.gpu, s.expert) for s in layer.slots]
        assert len(pairs) == len(set(pairs))


def test_plan_eplb_budget_below_one_block_is_infeasible():
    cluster = make_cluster(budget=expert_bytes(make_model(), "bf16"))  # 1 slot, needs 2
    with pytest.raises(InfeasiblePlan, match="8 GPUs miss 36864 bytes"):
        plan_eplb(make_model(), cluster, golden_loads())


def test_plain_ep_is_contiguous_blocks_in_bf16():
    plan = plan_plain_ep(make_model(), make_cluster(1, 4), golden_loads())
    for layer in plan.layers:
        assert [(s.gpu, s.expert, s.fmt, s.share) for s in layer.slots] == [(e // 3, e, "bf16", 1.0) for e in range(12)]
    assert [layer.layer for layer in plan.layers] == [0, 1]


def test_plain_ep_with_more_gpus_than_experts_names_both_counts():
    with pytest.raises(SpecError, match="16 GPUs .* 12 experts"):
        plan_plain_ep(make_model(), make_cluster(2, 8), golden_loads())


def test_plain_ep_over_budget_names_gpus_and_missing_bytes():
    cluster = make_cluster(1, 4, budget=2 * expert_bytes(make_model(), "bf16"))
    with pytest.raises(InfeasiblePlan, match=r"GPU 0: \d+ bytes"):
        plan_plain_ep(make_model(), cluster, golden_loads())


def test_export_sglang_of_eplb_plan_is_its_physical_to_logical_map():
    plan = plan_eplb(make_model(), make_cluster(budget=2 * expert_bytes(make_model(), "bf16")), golden_loads(), num_groups=4)
    assert export_sglang(plan) == {"physical_to_logical_map": GOLDEN_PHY2LOG}


def test_export_sglang_keeps_every_copy_of_a_quantized_plan_in_place():
    from rnq_ep.planner import plan_rnq

    options = PlanOptions(formats=("bf16", "int8"), quality_budget=1.0)
    plan = plan_rnq(make_model(), make_cluster(1, 4), golden_loads(), options)
    assert any(s.fmt != "bf16" for layer in plan.layers for s in layer.slots)
    phy2log, _, _ = plan_arrays(plan)
    exported = np.array(export_sglang(plan)["physical_to_logical_map"])
    assert (exported >= 0).all() and (exported[phy2log >= 0] == phy2log[phy2log >= 0]).all()
