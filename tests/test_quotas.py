"""Device quotas equal the host reference exactly: least-loaded (Triton and the CPU op), static and hash."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.balance import SlotTable, water_fill
from rnq_ep.quotas import POLICIES, policy_quotas, route_table
from rnq_ep.routing import copy_quotas

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def tables(draw, max_gpus=64, max_experts=256, max_copies=4):
    """A slot table with 1..max_copies copies per expert, some pairs on one GPU (EPLB makes those), random
    formats, and counts with zeros: (table, counts [E])."""
    gpus = draw(st.integers(1, max_gpus))
    experts = draw(st.integers(1, max_experts))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    copies = rng.integers(1, max_copies + 1, experts)
    gpu = np.concatenate([rng.choice(gpus, c, replace=draw(st.booleans()) or c > gpus) for c in copies])
    expert = np.repeat(np.arange(experts), copies)
    fmt = rng.integers(0, 3, len(expert))
    share = np.ones(len(expert)) / copies[expert]
    table = SlotTable.from_arrays(gpu, expert, fmt, share, gpus, experts)
    counts = rng.integers(0, 50, experts) * (rng.random(experts) < 0.8) * rng.integers(1, 40, experts)
    return table, counts.astype(np.int64)


@settings(max_examples=150, deadline=None)
@given(tables(), st.sampled_from(POLICIES))
def test_device_quotas_equal_the_host_quotas(case, policy):
    table, counts = case
    route = route_table(table, 0, policy)
    got = policy_quotas(torch.from_numpy(counts), route).numpy()
    assert np.array_equal(got, copy_quotas(counts[None], table, policy))
    assert np.array_equal(np.bincount(table.expert, weights=got, minlength=table.num_experts), counts)


@settings(max_examples=25, deadline=None)
@given(tables(max_gpus=8, max_experts=12))
def test_the_triton_quota_kernel_pours_as_water_fill(case):
    """Run in Triton's interpreter on CPU (the package sets TRITON_INTERPRET without CUDA): same ints as the host."""
    import rnq_ep.kernels  # noqa: F401  (interpreter on before triton is imported)
    from rnq_ep.kernels.quotas import water_fill_quotas

    table, counts = case
    route = route_table(table, 0, "least-loaded")
    got = water_fill_quotas(
        torch.from_numpy(counts), route.slot_gpu, route.slot_expert, route.pour_experts, route.pour_slots, table.num_gpus
    )
    assert np.array_equal(got.numpy(), water_fill(table, counts))


def test_the_triton_quota_kernel_on_a_shipped_plan_layer():
    """A Mixtral plan at 4 GPUs from real counts, scored on another layer's: the kernel's quotas are water_fill's."""
    import rnq_ep.kernels  # noqa: F401
    from rnq_ep.kernels.quotas import water_fill_quotas
    from rnq_ep.planner.rnq import plan_rnq
    from rnq_ep.specs import PlanOptions, load_cluster, load_model, load_stats

    model = load_model("mixtral-8x7b")
    loads = load_stats(ROOT / "configs/loads/mixtral-8x7b-v0.1_olmoe-repo_github.json", model)
    plan = plan_rnq(model, load_cluster("cpu4"), loads, PlanOptions(formats=("bf16", "int8", "int4")))
    for layer in plan.layers[:4]:
        table = SlotTable.from_layer(layer, 4, model.num_experts)
        step = np.asarray(loads.counts[-1 - layer.layer % len(loads.counts)], dtype=np.int64)
        route = route_table(table, 0, "least-loaded")
        got = water_fill_quotas(torch.from_numpy(step), route.slot_gpu, route.slot_expert, route.pour_experts,
                                route.pour_slots, 4)
        assert np.array_equal(got.numpy(), water_fill(table, step))


SHIPPED = [("olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_arxiv.json", "olmoe-1b-7b-0924_olmoe-repo_github.json"),
           ("mixtral-8x7b", "mixtral-8x7b-v0.1_olmoe-repo_github.json", "mixtral-8x7b-v0.1_olmoe-repo_github.json"),
           ("deepseek-moe-16b", "deepseek-moe-16b-base_minipile.json", "deepseek-moe-16b-base_minipile.json")]


@pytest.mark.parametrize("model_name, plan_on, serve", SHIPPED)
def test_every_shipped_plan_layer_gets_the_host_quotas_on_the_device(model_name, plan_on, serve):
    """Each shipped load file planned for 8 GPUs (bf16+int8+int4), served on another file's (or layer's) counts: every
    policy's device quotas equal the host's on every layer; the Triton kernel (interpreter) on the first layer."""
    import rnq_ep.kernels  # noqa: F401
    from rnq_ep.kernels.quotas import water_fill_quotas
    from rnq_ep.planner.rnq import plan_rnq
    from rnq_ep.specs import PlanOptions, load_cluster, load_model, load_stats

    model = load_model(model_name)
    loads = load_stats(ROOT / "configs/loads" / plan_on, model)
    served = load_stats(ROOT / "configs/loads" / serve, model).counts
    plan = plan_rnq(model, load_cluster("h100x8"), loads, PlanOptions(formats=("bf16", "int8", "int4")))
    for index, layer in enumerate(plan.layers):
        table = SlotTable.from_layer(layer, 8, model.num_experts)
        counts = np.asarray(served[(index + 1) % len(served)], dtype=np.int64)
        for policy in POLICIES:
            got = policy_quotas(torch.from_numpy(counts), route_table(table, 0, policy)).numpy()
            assert np.array_equal(got, copy_quotas(counts[None], table, policy)), (index, policy)
        if index == 0:
            route = route_table(table, 0, "least-loaded")
            kernel = water_fill_quotas(torch.from_numpy(counts), route.slot_gpu, route.slot_expert, route.pour_experts,
                                       route.pour_slots, 8)
            assert np.array_equal(kernel.numpy(), water_fill(table, counts))


def test_static_routing_with_bad_shares_is_refused_when_the_table_is_built():
    table = SlotTable.from_arrays(np.array([0, 1]), np.array([0, 0]), np.zeros(2), np.array([0.5, 0.6]), 2, 1)
    with pytest.raises(ValueError, match="shares of expert 0 sum to 1.1"):
        route_table(table, 0, "static")
    with pytest.raises(ValueError, match="routing policy 'random'"):
        route_table(table, 0, "random")


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="Triton has no NVIDIA backend")
def test_the_quota_kernel_compiles_for_sm90_without_a_gpu():
    from aot import compile_sm90

    compiled = compile_sm90(
        "rnq_ep.kernels.quotas", "_water_fill_kernel",
        {"quotas_ptr": "*i64", "base_ptr": "*i64", "amount_ptr": "*i64", "order_ptr": "*i64", "slots_ptr": "*i64",
         "slot_gpu_ptr": "*i64", "num_gpus": "i32", "num_pours": "i32"},
        {"PASSES": 9, "POURS": 256, "COPIES": 4, "GPUS": 32, "BIG": 2**62}, num_warps=4,
    )
    assert "cubin" in compiled.asm and compiled.metadata.shared >= 0
    assert "ld.local" not in compiled.asm["ptx"]  # loads and parts stay in registers: no spills to local memory
