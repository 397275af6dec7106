"""Layout -> dispatch -> experts -> combine over 1, 2 and 4 gloo ranks equals one dense computation, both transports."""

import numpy as np
import pytest
import torch
from gloo import count_collectives, run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_cases import draw_topk, random_table

from rnq_ep.balance import SlotTable, gpu_loads
from rnq_ep.dispatch import combine, dispatch, gather_counts
from rnq_ep.layout import capacity_for, local_counts, step_layout
from rnq_ep.quotas import POLICIES, route_table
from rnq_ep.routing import copy_quotas, route

NUM_EXPERTS, HIDDEN, TOP_K = 6, 8, 3
# (seed, tokens on each rank, policy, transport); capacity needs the same T on every rank; rank 1 of one case is idle
CASES = [
    (1, (9, 5, 7, 6), "least-loaded", "exact"),
    (2, (16, 3, 11, 8), "static", "exact"),
    (3, (4, 12, 6, 9), "hash", "exact"),
    (4, (7, 0, 5, 3), "least-loaded", "exact"),
    (5, (8, 8, 8, 8), "least-loaded", "capacity"),
    (6, (12, 12, 12, 12), "static", "capacity"),
    (7, (5, 5, 5, 5), "hash", "capacity"),
]


def _make_case(seed, world, tokens):
    """A random layer with replicas on `world` GPUs, per-rank (x, topk_ids, topk_weights), expert maps."""
    rng = np.random.default_rng(seed)
    table = random_table(rng, world, NUM_EXPERTS, random_shares=False)
    p = rng.random(NUM_EXPERTS) ** 3 + 0.05
    ids = [draw_topk(rng, t, TOP_K, p) for t in tokens[:world]]
    xs = [torch.from_numpy(rng.standard_normal((t, HIDDEN)).astype(np.float32)) for t in tokens[:world]]
    weights = [torch.from_numpy(rng.random((t, TOP_K)).astype(np.float32)) for t in tokens[:world]]
    maps = torch.from_numpy((rng.standard_normal((NUM_EXPERTS, HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32))
    return table, xs, ids, weights, maps


def _dense(x, ids, weights, maps):
    """Single-process oracle: out[t] = sum_j w[t, j] * x[t] @ maps[ids[t, j]]."""
    return torch.einsum("th,tjhg,tj->tg", x, maps[ids], weights)


def _ep_step(table, x, ids, weights, maps, rank, policy, transport, factor=2.0):
    """One decide -> move on this rank (experts: each entry through its copy's expert map): (out, layout, received)."""
    world = table.num_gpus
    table_on_rank = route_table(table, rank, policy)
    flat, counts, health = local_counts(ids, NUM_EXPERTS)
    gathered = gather_counts(torch.cat([counts, health]), None, world)
    capacity = capacity_for(x.shape[0], ids.shape[1], world, factor) if transport == "capacity" else None
    layout = step_layout(ids, flat, gathered, table_on_rank, transport, capacity)
    recv, received = dispatch(x, weights, layout, table_on_rank.num_local, rank, None, world)
    local_experts = torch.from_numpy(table.expert[table.gpu == rank][table_on_rank.local_table_index])  # [C], format-major
    copy = torch.searchsorted(received.offsets[1:], torch.arange(recv.shape[0]), right=True)  # [N]
    expert = local_experts[copy.clamp(max=max(len(local_experts) - 1, 0))] if len(local_experts) else copy
    y = torch.einsum("nh,nhg->ng", recv, maps[expert]) * received.weights[:, None]
    return combine(y, layout, received, x.shape[0], x.dtype, None, world), layout, received


def _run_cases(rank, world):
    """Every case of CASES on this rank: output, routing and stats per case."""
    results = []
    for seed, tokens, policy, transport in CASES:
        table, xs, ids, weights, maps = _make_case(seed, world, tokens)
        out, layout, received = _ep_step(table, xs[rank], ids[rank], weights[rank], maps, rank, policy, transport)
        results.append(dict(out=out.numpy(), slots=layout.slots.numpy(), quotas=layout.quotas.numpy(),
                            entries=int(received.offsets[-1]), overflow=bool(layout.overflow)))
    return results


def _ranks_run_cases(rank, world):
    """Rank body: every case, a bad expert id on rank 1 (errors as text), one more good step, collectives counted."""
    results = _run_cases(rank, world)
    table, xs, ids, weights, maps = _make_case(9, world, (4, 4, 4, 4))
    bad_ids = ids[rank].clone()
    if rank == 1:
        bad_ids[0, 0] = NUM_EXPERTS
    error = ""
    try:
        _ep_step(table, xs[rank], bad_ids, weights[rank], maps, rank, "least-loaded", "exact")
    except ValueError as err:
        error = str(err)
    after, *_ = _ep_step(table, xs[rank], ids[rank], weights[rank], maps, rank, "least-loaded", "exact")
    collectives = {
        transport: count_collectives(
            lambda t=transport: _ep_step(table, xs[rank], ids[rank], weights[rank], maps, rank, "least-loaded", t))
        for transport in ("exact", "capacity")
    }
    overflow = _ep_step(table, xs[rank], ids[rank], weights[rank], maps, rank, "least-loaded", "capacity", 0.05)[1]
    return results, error, after.numpy(), collectives, bool(overflow.overflow)


def _check_against_dense(world, results_by_rank):
    """Every case on every rank equals the dense oracle; routing equals the host reference (rnq_ep.routing)."""
    for i, (seed, tokens, policy, _) in enumerate(CASES):
        table, xs, ids, weights, maps = _make_case(seed, world, tokens)
        counts = np.stack([np.bincount(t.reshape(-1).numpy(), minlength=NUM_EXPERTS) for t in ids])
        quotas = copy_quotas(counts, table, policy)
        loads = gpu_loads(table, quotas)
        for rank, results in enumerate(results_by_rank):
            expected = _dense(xs[rank], ids[rank], weights[rank], maps).numpy()
            np.testing.assert_allclose(results[i]["out"], expected, atol=1e-5, rtol=1e-5)
            assert np.array_equal(results[i]["quotas"], quotas)
            assert np.array_equal(results[i]["slots"], route(counts, table, ids[rank], rank, policy).numpy())
            assert results[i]["entries"] == loads[rank]
            assert not results[i]["overflow"]


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_ranks_run_cases, 2)


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(_ranks_run_cases, 4)


def test_one_rank_matches_the_dense_reference():
    _check_against_dense(1, [_run_cases(0, 1)])


@pytest.mark.slow
def test_two_ranks_match_the_dense_reference(two_ranks):
    _check_against_dense(2, [results for results, *_ in two_ranks])


@pytest.mark.slow
def test_four_ranks_match_the_dense_reference(four_ranks):
    _check_against_dense(4, [results for results, *_ in four_ranks])


@pytest.mark.slow
def test_collectives_per_step_exact_four_capacity_three(four_ranks):
    # counts all-gather; exact: row counts, rows, rows back; capacity: rows, rows back (equal split)
    for *_, collectives, _ in four_ranks:
        assert collectives["exact"] == {"all_gather": 1, "all_to_all_single": 3}
        assert collectives["capacity"] == {"all_gather": 1, "all_to_all_single": 2}


@pytest.mark.slow
def test_a_bad_expert_id_on_one_rank_fails_on_every_rank_and_the_group_survives(two_ranks):
    errors = [error for _, error, *_ in two_ranks]
    assert "expert id 6 out of range for 6 experts" in errors[1]
    assert "ranks [1] rejected their inputs" in errors[0]
    table, xs, ids, weights, maps = _make_case(9, 2, (4, 4, 4, 4))
    for rank, (_, _, after, *_) in enumerate(two_ranks):
        np.testing.assert_allclose(after, _dense(xs[rank], ids[rank], weights[rank], maps).numpy(), atol=1e-5)


@pytest.mark.slow
def test_a_tiny_capacity_overflows_on_every_rank_alike(four_ranks):
    assert [overflow for *_, overflow in four_ranks] == [True] * 4


def test_one_rank_runs_without_collectives():
    table, xs, ids, weights, maps = _make_case(5, 1, (10,))
    for transport in ("exact", "capacity"):
        step = lambda t=transport: _ep_step(table, xs[0], ids[0], weights[0], maps, 0, "least-loaded", t)  # noqa: E731
        assert count_collectives(step) == {}


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 9), st.integers(1, 4), st.sampled_from(POLICIES),
       st.sampled_from(("exact", "capacity")))
def test_one_rank_with_several_copies_of_an_expert_matches_the_dense_reference(seed, tokens, top_k, policy, transport):
    # one GPU may hold two copies of an expert here (EPLB does, the planner never): entries must still split
    rng = np.random.default_rng(seed)
    expert = np.r_[np.arange(NUM_EXPERTS), rng.integers(0, NUM_EXPERTS, 3)]
    share = 1.0 / np.bincount(expert)[expert]
    table = SlotTable.from_arrays(np.zeros(len(expert)), expert, np.zeros(len(expert)), share, 1, NUM_EXPERTS)
    ids = draw_topk(rng, tokens, top_k, np.ones(NUM_EXPERTS))
    x = torch.from_numpy(rng.standard_normal((tokens, HIDDEN)).astype(np.float32))
    weights = torch.from_numpy(rng.random((tokens, top_k)).astype(np.float32))
    maps = torch.from_numpy(rng.standard_normal((NUM_EXPERTS, HIDDEN, HIDDEN)).astype(np.float32))
    out, layout, received = _ep_step(table, x, ids, weights, maps, 0, policy, transport)
    torch.testing.assert_close(out, _dense(x, ids, weights, maps), atol=1e-4, rtol=1e-4)
    assert received.offsets.shape == (len(expert) + 1,)
    assert not bool(layout.overflow)


def test_a_step_of_one_rank_reads_the_device_once_exact_and_never_capacity():
    from rnq_ep.bench.syncs import count_syncs

    table, xs, ids, weights, maps = _make_case(5, 1, (10,))
    for transport, expected in (("exact", 1), ("capacity", 0)):
        syncs = count_syncs(lambda t=transport: _ep_step(table, xs[0], ids[0], weights[0], maps, 0, "least-loaded", t))
        assert syncs.total == expected, syncs
