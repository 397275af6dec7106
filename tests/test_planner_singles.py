"""even_singles: single-copy experts spread evenly over GPUs by swaps with same-format replica copies."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.planner.singles import even_singles


def test_singles_move_from_the_crowded_gpu_in_exchange_for_a_replica_copy():
    # GPU 0: singles 0, 1, 2; GPU 1: single 5 and copies of 3, 4; GPU 2: the other copies of 3, 4
    gpu = np.array([0, 0, 0, 1, 1, 2, 2, 1])
    expert = np.array([0, 1, 2, 3, 4, 3, 4, 5])
    fmt = np.zeros(8, dtype=np.int64)
    tokens = np.array([10.0, 10, 10, 5, 5, 5, 5, 10])  # GPU loads 30, 20, 10
    moved, *_ = even_singles((gpu, expert, fmt, tokens), 6, 3, slack=0.0)
    singles = np.bincount(moved[[0, 1, 2, 7]], minlength=3)
    assert singles.max() - singles.min() <= 1
    assert np.bincount(moved, weights=tokens, minlength=3).max() <= 30.0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_swaps_keep_bytes_copies_and_no_duplicates_and_the_max_load_within_slack(data):
    num_gpus = data.draw(st.integers(2, 6))
    num_experts = data.draw(st.integers(num_gpus, 4 * num_gpus))
    counts = np.array(data.draw(st.lists(st.integers(1, num_gpus), min_size=num_experts, max_size=num_experts)))
    expert = np.repeat(np.arange(num_experts), counts)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    gpu = np.concatenate([rng.permutation(num_gpus)[:c] for c in counts])  # distinct GPUs per expert
    fmt = rng.integers(0, 2, expert.size)
    tokens = rng.uniform(0, 10, expert.size)
    moved, same_expert, same_fmt, same_tokens = even_singles((gpu, expert, fmt, tokens), num_experts, num_gpus, 0.02)
    assert (same_expert == expert).all() and (same_fmt == fmt).all() and (same_tokens == tokens).all()
    for code in (0, 1):
        assert (np.bincount(moved[fmt == code], minlength=num_gpus) == np.bincount(gpu[fmt == code], minlength=num_gpus)).all()
    assert len({(g, e) for g, e in zip(moved.tolist(), expert.tolist())}) == expert.size
    before = np.bincount(gpu, weights=tokens, minlength=num_gpus).max()
    assert np.bincount(moved, weights=tokens, minlength=num_gpus).max() <= before * 1.02 + 1e-9
    single = counts[expert] == 1
    spread = lambda g: np.ptp(np.bincount(g[single], minlength=num_gpus))  # noqa: E731
    assert spread(moved) <= max(spread(gpu), 1)
