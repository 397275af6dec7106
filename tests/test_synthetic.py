"""synthetic: seeded Zipf windows whose per-layer hot sets drift; the zipf:S[:drift=D] parser."""

import numpy as np
import pytest

from rnq_ep.specs import LoadStats, SpecError
from rnq_ep.synthetic import (
    ZipfLoads, capped_zipf, hot_set_rankings, parse_zipf, sampled_windows, window_stats, zipf_windows,
)


def test_same_seed_gives_the_same_windows():
    one = zipf_windows(ZipfLoads(1.0, 0.2), 3, 16, 2, 3, 500, seed=7)
    two = zipf_windows(ZipfLoads(1.0, 0.2), 3, 16, 2, 3, 500, seed=7)
    assert np.array_equal(one, two)


def test_another_seed_gives_other_windows():
    one = zipf_windows(ZipfLoads(1.0, 0.2), 3, 16, 2, 2, 500, seed=7)
    two = zipf_windows(ZipfLoads(1.0, 0.2), 3, 16, 2, 2, 500, seed=8)
    assert not np.array_equal(one, two)


def test_every_window_and_layer_holds_tokens_times_top_k_assignments():
    counts = zipf_windows(ZipfLoads(0.8), 4, 32, 4, 3, 1000, seed=0)
    assert counts.shape == (3, 4, 32) and (counts.sum(axis=2) == 4000).all()


def test_without_drift_the_hot_set_stays():
    rankings = hot_set_rankings(4, 64, drift=0.0, windows=3, seed=1)
    assert (rankings == rankings[0]).all()


def test_drift_moves_about_that_fraction_of_ranks_between_windows():
    rankings = hot_set_rankings(8, 200, drift=0.25, windows=2, seed=1)
    moved = (rankings[0] != rankings[1]).mean()
    assert 0.2 < moved <= 0.25  # a drawn position may keep its expert by chance


def test_hot_sets_are_the_same_at_every_token_count():
    small = zipf_windows(ZipfLoads(1.2, 0.3), 2, 32, 2, 2, 2_000, seed=3)
    large = zipf_windows(ZipfLoads(1.2, 0.3), 2, 32, 2, 2, 200_000, seed=3)
    assert np.array_equal(small.argmax(axis=2), large.argmax(axis=2))


def test_no_expert_gets_more_than_one_in_top_k_of_the_assignments():
    prob = capped_zipf(8, 1.6, cap=0.5)
    assert prob.max() <= 0.5 + 1e-12 and abs(prob.sum() - 1) < 1e-12 and (np.diff(prob) <= 1e-12).all()


def test_higher_exponent_means_more_skew():
    flat, steep = capped_zipf(64, 0.4, 0.125), capped_zipf(64, 1.2, 0.125)
    assert flat.max() / flat.mean() < steep.max() / steep.mean()


def test_window_stats_is_a_load_file_of_the_counts():
    counts = zipf_windows(ZipfLoads(1.0), 2, 8, 2, 1, 100, seed=0)[0]
    stats = window_stats(counts, top_k=2, name="w")
    assert stats.counts == counts.tolist() and stats.num_experts == 8


@pytest.mark.parametrize("text, expected", [("zipf:1.2", ZipfLoads(1.2)), ("zipf:0.6:drift=0.5", ZipfLoads(0.6, 0.5))])
def test_parse_zipf_reads_exponent_and_drift(text, expected):
    assert parse_zipf(text) == expected


@pytest.mark.parametrize("text", ["zipf", "zipf:x", "zipf:1:0.3", "zipf:1:drift=2", "zipf:-1", "zipf:1:drift=0.1:z"])
def test_parse_zipf_rejects_malformed_text_naming_it(text):
    with pytest.raises(SpecError, match="--loads"):
        parse_zipf(text)


RECORDED = LoadStats(counts=[[600, 300, 100, 0], [250, 250, 250, 250]], num_experts=4, top_k=2)


def test_sampled_windows_hold_tokens_times_top_k_assignments_per_layer():
    counts = sampled_windows(RECORDED, windows=3, tokens=500, seed=0)
    assert counts.shape == (3, 2, 4) and (counts.sum(axis=2) == 1000).all()


def test_sampled_windows_follow_the_file_frequencies_and_never_draw_an_unseen_expert():
    counts = sampled_windows(RECORDED, windows=2, tokens=200_000, seed=1)
    assert (counts[:, 0, 3] == 0).all()
    assert np.allclose(counts[:, 0, :3] / 400_000, [0.6, 0.3, 0.1], atol=0.005)


def test_sampled_windows_differ_by_window_and_repeat_by_seed():
    one, two = sampled_windows(RECORDED, 2, 1000, seed=3), sampled_windows(RECORDED, 2, 1000, seed=3)
    assert np.array_equal(one, two) and not np.array_equal(one[0], one[1])


def test_sampled_windows_refuse_a_layer_without_tokens():
    empty = LoadStats(counts=[[0, 0], [1, 1]], num_experts=2, top_k=1, model="m.json")
    with pytest.raises(SpecError, match="no tokens"):
        sampled_windows(empty, 2, 10, seed=0)
