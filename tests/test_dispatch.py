"""Dispatch -> experts -> combine over 1, 2 and 4 gloo ranks equals one dense computation."""

from dataclasses import FrozenInstanceError

import numpy as np
import pytest
import torch
from gloo import count_collectives, run_ranks
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_cases import draw_topk, random_table

from rnq_ep.balance import SlotTable, gpu_loads
from rnq_ep.dispatch import combine, dispatch
from rnq_ep.routing import POLICIES, copy_quotas, slot_index

NUM_EXPERTS, HIDDEN, TOP_K = 6, 8, 3
# (seed, tokens on each rank, policy); rank 1 of the last case has no tokens at all
CASES = [
    (1, (9, 5, 7, 6), "least-loaded"),
    (2, (16, 3, 11, 8), "static"),
    (3, (4, 12, 6, 9), "hash"),
    (4, (7, 0, 5, 3), "least-loaded"),
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


def _apply_experts(recv, handle, table, maps):
    """Each recv row through its copy's expert map, times its router weight: [N, H] -> [N, H]."""
    rows_per_copy = (handle.local_offsets[1:] - handle.local_offsets[:-1]).long()  # [C]
    expert_of_copy = torch.from_numpy(table.expert[handle.local_slots])
    expert = torch.repeat_interleave(expert_of_copy, rows_per_copy)  # [N]
    return torch.einsum("nh,nhg->ng", recv, maps[expert]) * handle.recv_weights[:, None]


def _dense(x, ids, weights, maps):
    """Single-process oracle: out[t] = sum_j w[t, j] * x[t] @ maps[ids[t, j]]."""
    return torch.einsum("th,tjhg,tj->tg", x, maps[ids], weights)


def _ep_step(table, x, ids, weights, maps, rank, policy):
    """One dispatch -> experts -> combine on this rank; the output and the handle."""
    recv, handle = dispatch(x, ids, weights, table, rank, None, policy)
    return combine(_apply_experts(recv, handle, table, maps), handle), recv, handle


def _run_cases(rank, world):
    """Every case of CASES on this rank: output and stats per case."""
    results = []
    for seed, tokens, policy in CASES:
        table, xs, ids, weights, maps = _make_case(seed, world, tokens)
        out, recv, handle = _ep_step(table, xs[rank], ids[rank], weights[rank], maps, rank, policy)
        results.append(dict(out=out.numpy(), recv_rows=len(recv), tokens_per_gpu=handle.tokens_per_gpu,
                            bytes=handle.bytes_sent, bytes_no_dedupe=handle.bytes_sent_no_dedupe))
    return results


def _collectives_of_one_step(table, x, ids, weights, maps, rank):
    """How often one dispatch -> combine calls each torch.distributed collective: name -> calls."""
    return count_collectives(lambda: _ep_step(table, x, ids, weights, maps, rank, "least-loaded"))


def _ranks_run_cases(rank, world):
    """Rank body: every case, then the bad-input cases (errors as text), then one more good step, counted."""
    results = _run_cases(rank, world)
    table, xs, ids, weights, maps = _make_case(9, world, (4, 4, 4, 4))
    errors = {}
    wide = torch.zeros(4, HIDDEN + 1) if rank == 1 else xs[rank]
    bad_ids = ids[rank].clone()
    if rank == 1:
        bad_ids[0, 0] = NUM_EXPERTS
    for name, x, topk_ids in (("hidden", wide, ids[rank]), ("ids", xs[rank], bad_ids)):
        try:
            dispatch(x, topk_ids, weights[rank], table, rank, None)
        except ValueError as err:
            errors[name] = str(err)
    after, _, _ = _ep_step(table, xs[rank], ids[rank], weights[rank], maps, rank, "least-loaded")
    collectives = _collectives_of_one_step(table, xs[rank], ids[rank], weights[rank], maps, rank)
    return results, errors, after.numpy(), collectives


def _check_against_dense(world, results_by_rank):
    """Every case on every rank equals the dense oracle; routing stats agree with one global computation."""
    for i, (seed, tokens, policy) in enumerate(CASES):
        table, xs, ids, weights, maps = _make_case(seed, world, tokens)
        counts = np.stack([np.bincount(t.reshape(-1).numpy(), minlength=NUM_EXPERTS) for t in ids])
        loads = gpu_loads(table, copy_quotas(counts, table, policy))
        for rank, results in enumerate(results_by_rank):
            expected = _dense(xs[rank], ids[rank], weights[rank], maps).numpy()
            np.testing.assert_allclose(results[i]["out"], expected, atol=1e-5, rtol=1e-5)
            assert np.array_equal(results[i]["tokens_per_gpu"], loads)
            assert results[i]["recv_rows"] == loads[rank]


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
def test_dedupe_never_sends_more_bytes_and_saves_some(four_ranks):
    steps = [step for results, *_ in four_ranks for step in results]
    assert all(step["bytes"] <= step["bytes_no_dedupe"] for step in steps)
    assert sum(step["bytes"] for step in steps) < sum(step["bytes_no_dedupe"] for step in steps)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(0, 9), st.integers(1, 4), st.sampled_from(POLICIES))
def test_one_rank_with_several_copies_of_an_expert_matches_the_dense_reference(seed, tokens, top_k, policy):
    # one GPU may hold two copies of an expert here (the planner never does): fan-out must still split them
    rng = np.random.default_rng(seed)
    expert = np.r_[np.arange(NUM_EXPERTS), rng.integers(0, NUM_EXPERTS, 3)]
    share = 1.0 / np.bincount(expert)[expert]
    table = SlotTable.from_arrays(np.zeros(len(expert)), expert, np.zeros(len(expert)), share, 1, NUM_EXPERTS)
    ids = draw_topk(rng, tokens, top_k, np.ones(NUM_EXPERTS))
    x = torch.from_numpy(rng.standard_normal((tokens, HIDDEN)).astype(np.float32))
    weights = torch.from_numpy(rng.random((tokens, top_k)).astype(np.float32))
    maps = torch.from_numpy(rng.standard_normal((NUM_EXPERTS, HIDDEN, HIDDEN)).astype(np.float32))
    out, recv, handle = _ep_step(table, x, ids, weights, maps, 0, policy)
    torch.testing.assert_close(out, _dense(x, ids, weights, maps), atol=1e-5, rtol=1e-5)
    assert len(handle.tokens_per_copy) == len(expert)


@pytest.mark.slow
def test_one_counts_all_gather_serves_routing_and_split_sizes(four_ranks):
    # dispatch: counts all-gather, meta and rows all-to-all; combine: rows back. No other collective.
    for *_, collectives in four_ranks:
        assert collectives == {"all_gather": 1, "all_to_all_single": 3}


def test_one_rank_runs_without_collectives():
    table, xs, ids, weights, maps = _make_case(5, 1, (10,))
    assert _collectives_of_one_step(table, xs[0], ids[0], weights[0], maps, 0) == {}


def test_one_rank_sends_no_bytes():
    table, xs, ids, weights, maps = _make_case(5, 1, (10,))
    _, _, handle = _ep_step(table, xs[0], ids[0], weights[0], maps, 0, "least-loaded")
    assert handle.bytes_sent == handle.bytes_sent_no_dedupe == 0


@pytest.mark.slow
def test_hidden_size_that_differs_between_ranks_fails_on_every_rank(two_ranks):
    for _, errors, *_ in two_ranks:
        assert "hidden size differs between ranks (by rank: [8, 9])" in errors["hidden"]


@pytest.mark.slow
def test_bad_expert_id_on_one_rank_fails_on_every_rank_and_the_group_survives(two_ranks):
    (_, errors0, after0, _), (_, errors1, after1, _) = two_ranks
    assert "expert id 6 out of range for 6 experts" in errors1["ids"]
    assert "ranks [1] rejected their inputs" in errors0["ids"]
    table, xs, ids, weights, maps = _make_case(9, 2, (4, 4))
    np.testing.assert_allclose(after1, _dense(xs[1], ids[1], weights[1], maps).numpy(), atol=1e-5)


def test_the_handle_is_frozen():
    table, xs, ids, weights, _ = _make_case(8, 1, (5,))
    _, handle = dispatch(xs[0], ids[0], weights[0], table, 0, None)
    with pytest.raises(FrozenInstanceError):
        handle.num_tokens = 4


def test_recv_rows_are_grouped_by_local_copy():
    table, xs, ids, weights, maps = _make_case(6, 1, (12,))
    recv, handle = dispatch(xs[0], ids[0], weights[0], table, 0, None)
    assert handle.local_offsets.dtype == torch.int32
    assert handle.local_offsets.tolist() == [0, *np.cumsum(handle.tokens_per_copy).tolist()]
    assert len(recv) == len(handle.recv_weights) == handle.local_offsets[-1] == 12 * TOP_K


def test_nan_in_x_reaches_its_token_and_no_other():
    table, xs, ids, weights, maps = _make_case(7, 1, (6,))
    xs[0][2, 3] = float("nan")
    out, _, _ = _ep_step(table, xs[0], ids[0], weights[0], maps, 0, "least-loaded")
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[[0, 1, 3, 4, 5]]).all()


def test_mismatched_topk_shapes_are_rejected():
    table, xs, ids, weights, _ = _make_case(8, 1, (5,))
    with pytest.raises(ValueError, match=r"topk_weights has shape \(5, 2\)"):
        dispatch(xs[0], ids[0], weights[0][:, :2], table, 0, None)
    with pytest.raises(ValueError, match=r"topk_ids has shape \(4, 3\), expected \(5, k\)"):
        dispatch(xs[0], ids[0][:4], weights[0][:4], table, 0, None)


def test_out_of_range_expert_id_is_named():
    table, xs, ids, weights, _ = _make_case(8, 1, (5,))
    ids[0][1, 1] = -1
    with pytest.raises(ValueError, match="expert id -1 out of range for 6 experts"):
        dispatch(xs[0], ids[0], weights[0], table, 0, None)


def test_table_for_another_world_size_is_rejected():
    table, xs, ids, weights, _ = _make_case(8, 2, (5, 5))
    with pytest.raises(ValueError, match="slot table has 2 GPUs but the process group has 1 ranks"):
        dispatch(xs[0], ids[0], weights[0], table, 0, None)


def test_a_kept_index_gives_the_same_step_and_one_of_another_table_is_rejected():
    table, xs, ids, weights, _ = _make_case(8, 1, (5,))
    index = slot_index(table)
    recv, handle = dispatch(xs[0], ids[0], weights[0], table, 0, None, index=index)
    fresh, fresh_handle = dispatch(xs[0], ids[0], weights[0], table, 0, None)
    assert torch.equal(recv, fresh) and torch.equal(handle.recv_row, fresh_handle.recv_row)
    other, *_ = _make_case(9, 1, (5,))
    with pytest.raises(ValueError, match="index was built for another table"):
        dispatch(xs[0], ids[0], weights[0], other, 0, None, index=index)


def test_combine_rejects_outputs_of_the_wrong_length():
    table, xs, ids, weights, _ = _make_case(8, 1, (5,))
    recv, handle = dispatch(xs[0], ids[0], weights[0], table, 0, None)
    with pytest.raises(ValueError, match=r"expected \(15, hidden\)"):
        combine(recv[1:], handle)


def test_bf16_tokens_come_back_in_bf16_close_to_the_fp32_reference():
    table, xs, ids, weights, maps = _make_case(10, 1, (9,))
    out, _, _ = _ep_step(table, xs[0].bfloat16(), ids[0], weights[0], maps.bfloat16(), 0, "least-loaded")
    assert out.dtype == torch.bfloat16
    expected = _dense(xs[0].bfloat16().float(), ids[0], weights[0], maps.bfloat16().float())
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)
