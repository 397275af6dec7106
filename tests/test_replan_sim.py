"""replan_sim: re-plan policies after a shift of domain recover the step time and pay for their moves."""

import numpy as np
import pytest
from handmade_plans import stats_of
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.bench.planner import scaled_cluster
from rnq_ep.policies import Policy, run_policy
from rnq_ep.replan_sim import REPLAN_POLICIES, run_replanning
from rnq_ep.specs import load_cluster, load_model

MODEL = load_model("olmoe-1b-7b")  # 64 experts: at 4 GPUs EPLB +12.5 % has room for replicas (tiny's 8 have none)
CLUSTER = scaled_cluster(load_cluster("h100x8"), 4)
TOKENS_PER_GPU = 4096


def zipf_counts(exponent: float, seed: int, layers: int = 2) -> list[list[int]]:
    """[layers][64] counts, Zipf over a seeded random ranking of the experts (+1: no empty expert)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, MODEL.num_experts + 1) ** -exponent
    return [(np.rint(1e5 * weights[rng.permutation(MODEL.num_experts)]) + 1).astype(int).tolist() for _ in range(layers)]


HOT_LOW, HOT_HIGH = zipf_counts(1.0, seed=0), zipf_counts(1.0, seed=1)  # other hot experts: a shift of domain


def static(policy: Policy) -> Policy:
    """The same placement and routing, planned once."""
    return Policy(policy.name.removesuffix(" + re-plan"), policy.placement, policy.routing, policy.extra_memory,
                  policy.formats)


def shifted(plan_on: list[list[int]], *scored: list[list[int]]) -> list:
    plan_stats = stats_of(MODEL, plan_on)
    return [(plan_stats, stats_of(MODEL, counts)) for counts in scored]


def test_static_policies_plan_once_for_windows_that_plan_on_the_same_loads():
    placements = {}
    run_policy(static(REPLAN_POLICIES[0]), MODEL, CLUSTER, shifted(HOT_LOW, HOT_HIGH, HOT_HIGH, HOT_LOW), 64, placements)
    assert len(placements) == 1


def test_replanning_recovers_when_the_scored_loads_repeat_the_previous_window():
    for policy in REPLAN_POLICIES:
        windows = shifted(HOT_LOW, HOT_HIGH, HOT_HIGH)
        replanned = run_replanning(policy, MODEL, CLUSTER, windows, TOKENS_PER_GPU)
        stale = run_policy(static(policy), MODEL, CLUSTER, windows, TOKENS_PER_GPU)
        assert replanned.replans == 1 and replanned.replan_layers > 0, policy.name
        assert replanned.layer_s < stale.layer_s, policy.name


@settings(max_examples=20, deadline=None)
@given(st.floats(0.0, 2.0), st.integers(0, 2**16), st.integers(0, 2**16), st.integers(1, 100), st.sampled_from(REPLAN_POLICIES))
def test_a_replanned_window_is_never_slower_than_the_stale_plan_moves_included(exponent, before, after, interval, policy):
    seen = zipf_counts(exponent, after)
    windows = shifted(zipf_counts(exponent, before), seen, seen)
    replanned = run_replanning(policy, MODEL, CLUSTER, windows, TOKENS_PER_GPU, interval)
    stale = run_policy(static(policy), MODEL, CLUSTER, windows, TOKENS_PER_GPU)
    assert replanned.layer_s <= stale.layer_s * (1 + 1e-12)


def test_nothing_moves_and_nothing_is_charged_when_the_loads_do_not_change():
    for policy in REPLAN_POLICIES:
        windows = shifted(HOT_LOW, HOT_LOW, HOT_LOW, HOT_LOW)
        run = run_replanning(policy, MODEL, CLUSTER, windows, TOKENS_PER_GPU)
        assert run.replans == 2 and (run.replan_layers, run.replan_bytes, run.replan_s, run.move_s) == (0, 0, 0, 0)
        assert run.layer_s == run_policy(static(policy), MODEL, CLUSTER, windows, TOKENS_PER_GPU).layer_s


def test_moves_are_charged_their_link_time_divided_by_the_interval():
    # a shift whose gain on layer 1 pays for EPLB's moves within one step, so both intervals move the same layer
    windows = shifted(zipf_counts(1.5, seed=0), zipf_counts(1.5, seed=1), zipf_counts(1.5, seed=1))
    every_step = run_replanning(REPLAN_POLICIES[1], MODEL, CLUSTER, windows, TOKENS_PER_GPU, interval=1)
    every_tenth = run_replanning(REPLAN_POLICIES[1], MODEL, CLUSTER, windows, TOKENS_PER_GPU, interval=10)
    assert every_step.replan_bytes == every_tenth.replan_bytes > 0
    assert every_step.replan_s == every_tenth.replan_s > 0
    assert np.isclose(every_step.move_s, 10 * every_tenth.move_s)
    # two windows, two layers: the re-plan's link time, spread over the interval, in the mean over four scored layers
    assert np.isclose(every_step.move_s, every_step.replan_s / 4)


def test_a_replan_interval_below_one_step_is_refused():
    with pytest.raises(ValueError, match="interval"):
        run_replanning(REPLAN_POLICIES[0], MODEL, CLUSTER, shifted(HOT_LOW, HOT_LOW), TOKENS_PER_GPU, interval=0)
