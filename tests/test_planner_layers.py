"""The planner's work on all layers at once gives each layer what the one-layer code gives it."""

from __future__ import annotations

from unittest import mock

import msgspec
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rnq_ep.planner import initial, plan_rnq, transport
from rnq_ep.planner.initial import first_fitting_counts, initial_copies
from rnq_ep.planner.layout import InfeasiblePlan
from rnq_ep.planner.limits import Limits
from rnq_ep.planner.place import pack_by_rounds, pack_rows_by_rounds, replica_order
from rnq_ep.planner.transport import transport_layers
from test_planner_invariants import planning_problems
from transport_reference import transport_reference

FMT_BYTES = np.array([100, 52, 28])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 5), st.integers(1, 12), st.integers(1, 6))
def test_packing_rows_at_once_packs_each_row_as_alone(seed, num_rows, num_experts, num_gpus):
    rng = np.random.default_rng(seed)
    copies = num_experts + int(rng.integers(0, num_experts * (num_gpus - 1) + 1))
    expert = np.empty((num_rows, copies), dtype=np.int64)
    for row in range(num_rows):  # every expert 1..G copies, `copies` in all
        counts = np.ones(num_experts, dtype=np.int64)
        for _ in range(copies - num_experts):
            counts[rng.choice(np.flatnonzero(counts < num_gpus))] += 1
        expert[row] = rng.permutation(np.repeat(np.arange(num_experts), counts))
    load = rng.integers(0, 4, (num_rows, copies)).astype(np.float64)  # few values: ties and clashes
    packed = pack_rows_by_rounds(expert, load, num_gpus)
    for row in range(num_rows):
        assert np.array_equal(packed[row], pack_by_rounds(expert[row], load[row], num_gpus))


def layer_limits(rng: np.random.Generator, num_experts: int, weight: np.ndarray, slots: int) -> Limits:
    """Limits of a random layer: a budget of `slots` bf16 experts per GPU, int4 allowed or not, a random
    sensitivity scale and quality budget."""
    cost = np.tile([0.0, 1.0, 4.0], (num_experts, 1)) * rng.integers(1, 4, (num_experts, 1))
    if rng.random() < 0.5:
        cost[:, 2] = np.inf
    return Limits(
        budget=slots * int(FMT_BYTES[0]),
        fmt_bytes=FMT_BYTES,
        cost=cost,
        token_budget=float(rng.choice([0.05, 0.25, 0.6])) * float(weight.sum()),
        max_copies=int(rng.choice([1, 2, 3, 99])),
        max_held=slots * int(FMT_BYTES[0]) // int(FMT_BYTES[1 if np.isinf(cost[0, 2]) else 2]),
        gpus_per_node=2,
        prefer_node=False,
    )


@settings(max_examples=120, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(2, 24), st.integers(1, 32), st.integers(1, 3))
def test_first_fitting_counts_are_each_layers_first_count_whose_initial_copies_fit(seed, num_layers, num_experts, num_gpus, slots):
    rng = np.random.default_rng(seed)
    slots = max(slots, -(-num_experts // num_gpus))  # one bf16 copy of every expert fits
    weights = (rng.zipf(1.5, (num_layers, num_experts)) % 200).astype(np.float64)
    limits = [layer_limits(rng, num_experts, weight, slots) for weight in weights]
    room = min(lim.max_held for lim in limits) * num_gpus - num_experts  # as rnq.replica_counts: every GPU can hold its copies
    assume(room > 0)
    counts = sorted({int(c) for c in rng.integers(1, room + 1, 3)} | {0}, reverse=True)
    rankings = [replica_order(weight, counts[0], num_gpus) for weight in weights]
    replica_limits = [lim.with_token_budget(lim.token_budget * 0.8) for lim in limits]
    reuses: list[dict] = [{} for _ in weights]
    found = first_fitting_counts(weights, rankings, num_gpus, limits, replica_limits, counts, reuses)
    for layer, (weight, ranked, lim, replica_lim, (start, fitted), reuse) in enumerate(
        zip(weights, rankings, limits, replica_limits, found, reuses)
    ):
        alone: dict = {}
        expected = (0, None)
        for extra in counts:
            if ranked.size < extra:  # few experts: the layer leaves the batch here, its own trials go on from it
                expected = (extra, None)
                break
            try:
                counts_of_expert = 1 + np.bincount(ranked[:extra], minlength=num_experts)
                copies = initial_copies(weight, counts_of_expert, num_gpus, replica_lim if extra else lim, layer, alone)
            except InfeasiblePlan:
                continue
            expected = (extra, copies)
            break
        assert start == expected[0]
        assert (fitted is None) == (expected[1] is None)
        if fitted is not None:
            assert all(np.array_equal(a, b) for a, b in zip(fitted, expected[1]))
        assert reuse.keys() == alone.keys()
        for key, packing in reuse.items():
            assert all(np.array_equal(a, b) for a, b in zip(packing, alone[key]))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(4, 48), st.integers(2, 40), st.integers(1, 3))
def test_transport_of_layers_end_to_end_gives_each_layer_its_own_pass(seed, num_layers, num_experts, num_gpus, slots):
    rng = np.random.default_rng(seed)
    slots = max(slots, -(-num_experts // num_gpus))
    weights = (rng.zipf(1.5, (num_layers, num_experts)) % 200).astype(np.float64)
    weights[rng.random(num_layers) < 0.2] = 7.0  # some layers may be balanced already
    copies_of, limits_of = [], []
    for layer, weight in enumerate(weights):
        limits = layer_limits(rng, num_experts, weight, slots)
        room = limits.max_held * num_gpus - num_experts
        extra = int(rng.integers(0, room + 1))
        ranked = replica_order(weight, extra, num_gpus)
        try:
            copies = initial_copies(weight, 1 + np.bincount(ranked, minlength=num_experts), num_gpus, limits, layer, {})
        except InfeasiblePlan:
            continue
        copies_of.append(copies)
        limits_of.append(limits)
    assume(copies_of)
    together = transport_layers(copies_of, limits_of, num_gpus, num_experts)
    for copies, limits, (moved, quantized) in zip(copies_of, limits_of, together):
        expected, expected_quantized = transport_reference(copies, limits, num_gpus, num_experts)
        assert quantized == expected_quantized
        for column, expected_column in zip(moved, expected):
            assert column.dtype == expected_column.dtype
            assert np.array_equal(column, expected_column)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_problems(), st.booleans())
def test_planning_all_layers_at_once_plans_each_layer_as_alone(problem, small_batches):
    model, cluster, loads, options = problem
    cells = 2 * model.num_experts * cluster.num_gpus if small_batches else transport.BATCH_CELLS  # 2: as at 1024 GPUs
    try:
        with mock.patch.object(initial, "BATCH_CELLS", cells), mock.patch.object(transport, "BATCH_CELLS", cells):
            together = plan_rnq(model, cluster, loads, options)
    except InfeasiblePlan as err:
        together = err
    alone = []
    for index, row in enumerate(loads.counts):
        one_layer = msgspec.structs.replace(loads, counts=[row], layer_ids=[loads.layers[index]])
        try:
            alone.append(plan_rnq(model, cluster, one_layer, options).layers[0])
        except InfeasiblePlan:
            alone.append(None)
    if None in alone:  # a layer that cannot be planned makes the whole plan fail
        assert isinstance(together, InfeasiblePlan)
    else:
        assert not isinstance(together, InfeasiblePlan)
        assert list(together.layers) == alone
