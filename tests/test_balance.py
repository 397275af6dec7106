"""Properties of the token-split functions shared by routing, metrics and the planner."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.balance import SlotTable, gpu_loads, lp_min_max_load, share_quotas, water_fill
from rnq_ep.planner.water_layers import water_fill_layers
from water_fill_reference import water_fill_reference


@st.composite
def layer_instances(draw, max_experts=10, max_gpus=5, duplicates=False):
    """A random layer: every expert has 1..G copies on distinct GPUs (or, with duplicates, any GPUs, as EPLB
    may place two copies of an expert on one GPU), counts skewed."""
    num_experts = draw(st.integers(1, max_experts))
    num_gpus = draw(st.integers(1, max_gpus))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    gpu, expert, fmt = [], [], []
    for e in range(num_experts):
        copies = rng.integers(1, num_gpus + 1)
        for g in rng.choice(num_gpus, copies, replace=duplicates):
            gpu.append(g)
            expert.append(e)
            fmt.append(rng.integers(0, 3))
    expert_arr = np.array(expert)
    share = 1.0 / np.bincount(expert_arr)[expert_arr]
    table = SlotTable.from_arrays(np.array(gpu), expert_arr, np.array(fmt), share, num_gpus, num_experts)
    counts = rng.integers(0, 60, num_experts) * rng.integers(1, 30, num_experts)
    return table, counts


@settings(max_examples=200, deadline=None)
@given(layer_instances())
def test_water_fill_quotas_sum_to_each_experts_count(instance):
    table, counts = instance
    quotas = water_fill(table, counts)
    assert (quotas >= 0).all()
    assert np.array_equal(np.bincount(table.expert, weights=quotas, minlength=table.num_experts), counts)


@settings(max_examples=400, deadline=None)
@given(layer_instances(max_experts=14, max_gpus=7), st.integers(0, 3))
def test_water_fill_equals_its_reference_exactly(instance, scale):
    table, counts = instance
    counts = counts // 10**scale  # small counts make ties and one-token remainders common
    assert np.array_equal(water_fill(table, counts), water_fill_reference(table, counts))


@settings(max_examples=200, deadline=None)
@given(layer_instances(duplicates=True))
def test_water_fill_equals_its_reference_when_a_gpu_holds_two_copies_of_an_expert(instance):
    table, counts = instance
    assert np.array_equal(water_fill(table, counts), water_fill_reference(table, counts))


def test_water_fill_equals_its_reference_on_a_wide_replicated_layer():
    rng = np.random.default_rng(7)
    num_gpus, num_experts = 64, 96
    copies = rng.integers(1, 9, num_experts)
    expert = np.repeat(np.arange(num_experts), copies)
    gpu = np.concatenate([rng.choice(num_gpus, c, replace=False) for c in copies])
    fmt = rng.integers(0, 3, expert.size)
    table = SlotTable.from_arrays(gpu, expert, fmt, 1.0 / copies[expert], num_gpus, num_experts)
    counts = rng.zipf(1.5, num_experts).clip(max=10**6) * 37
    assert np.array_equal(water_fill(table, counts), water_fill_reference(table, counts))


@settings(max_examples=200, deadline=None)
@given(layer_instances())
def test_share_quotas_sum_to_each_experts_count(instance):
    table, counts = instance
    quotas = share_quotas(table, counts)
    assert (quotas >= 0).all()
    assert np.array_equal(np.bincount(table.expert, weights=quotas, minlength=table.num_experts), counts)


@settings(max_examples=150, deadline=None)
@given(layer_instances())
def test_water_fill_is_within_two_percent_of_the_lp_bound(instance):
    table, counts = instance
    best = gpu_loads(table, water_fill(table, counts)).max()
    bound = lp_min_max_load(table, counts)
    assert bound - 1e-6 <= best <= np.ceil(bound - 1e-9) + 0.02 * bound + 1


@settings(max_examples=100, deadline=None)
@given(layer_instances())
def test_water_fill_never_worse_than_planned_shares(instance):
    table, counts = instance
    best = gpu_loads(table, water_fill(table, counts)).max()
    static = gpu_loads(table, share_quotas(table, counts)).max()
    assert best <= static + 0.02 * static + 1


def test_water_fill_is_deterministic():
    rng = np.random.default_rng(3)
    gpu = np.array([0, 1, 2, 3, 1, 2, 0])
    expert = np.array([0, 1, 2, 3, 0, 0, 1])
    table = SlotTable.from_arrays(gpu, expert, np.zeros(7), np.full(7, 0.5), 4, 4)
    counts = rng.integers(0, 1000, 4)
    assert np.array_equal(water_fill(table, counts), water_fill(table, counts))


def test_single_copy_experts_take_all_their_tokens():
    table = SlotTable.from_arrays(np.arange(4), np.arange(4), np.zeros(4), np.ones(4), 4, 4)
    counts = np.array([5, 0, 7, 100])
    assert np.array_equal(water_fill(table, counts), counts)


def test_bf16_copy_wins_a_tie_against_an_int8_copy():
    # expert 0 has an int8 copy on gpu 0 and a bf16 copy on gpu 1; both GPUs empty; 1 token
    table = SlotTable.from_arrays(np.array([0, 1]), np.array([0, 0]), np.array([1, 0]), np.full(2, 0.5), 2, 1)
    assert water_fill(table, np.array([1])).tolist() == [0, 1]


def test_water_fill_levels_a_hot_expert_against_fixed_loads():
    # gpu 0 holds cold expert 1 (40 tokens); hot expert 0 (100 tokens) has copies on both GPUs
    table = SlotTable.from_arrays(np.array([0, 0, 1]), np.array([0, 1, 0]), np.zeros(3), np.array([.5, 1, .5]), 2, 2)
    quotas = water_fill(table, np.array([100, 40]))
    assert gpu_loads(table, quotas).tolist() == [70, 70]


def test_bad_counts_are_rejected_with_the_shape():
    table = SlotTable.from_arrays(np.arange(2), np.arange(2), np.zeros(2), np.ones(2), 2, 2)
    with pytest.raises(ValueError, match="shape"):
        water_fill(table, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=">= 0"):
        water_fill(table, np.array([1, -2]))


def test_an_expert_without_a_copy_is_rejected():
    with pytest.raises(ValueError, match="without any copy"):
        SlotTable.from_arrays(np.array([0]), np.array([0]), np.zeros(1), np.ones(1), 2, 2)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(layer_instances(max_experts=14, max_gpus=7), st.integers(0, 3)), min_size=1, max_size=6))
def test_water_fill_of_layers_side_by_side_equals_water_fill_of_each(layers):
    tables = [table for (table, _), _ in layers]
    counts = [counts // 10**scale for (_, counts), scale in layers]  # small counts: ties and remainders
    for table, layer_counts, quotas in zip(tables, counts, water_fill_layers(tables, counts)):
        assert np.array_equal(quotas, water_fill(table, layer_counts))


@settings(max_examples=50, deadline=None)
@given(st.lists(layer_instances(duplicates=True), min_size=1, max_size=4))
def test_water_fill_of_layers_equals_water_fill_when_a_gpu_holds_two_copies(layers):
    tables, counts = [table for table, _ in layers], [counts for _, counts in layers]
    for table, layer_counts, quotas in zip(tables, counts, water_fill_layers(tables, counts)):
        assert np.array_equal(quotas, water_fill(table, layer_counts))


def test_water_fill_of_layers_rejects_bad_counts_like_water_fill():
    table = SlotTable.from_arrays(np.array([0, 1]), np.array([0, 0]), np.zeros(2), np.full(2, 0.5), 2, 1)
    with pytest.raises(ValueError, match="must be >= 0"):
        water_fill_layers([table], [np.array([-3])])
    with pytest.raises(ValueError, match="shape"):
        water_fill_layers([table], [np.array([3, 4])])
