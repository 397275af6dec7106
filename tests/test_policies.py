"""policies: the placements users compare, hash vs least-loaded copy choice, LLEP's spill rule, run_policy."""

import numpy as np
from handmade_plans import stats_of
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.balance import SlotTable, gpu_loads
from rnq_ep.bench.planner import scaled_cluster
from rnq_ep.costmodel import predict_layer_time, weight_move_time
from rnq_ep.memory import expert_bytes, plain_ep_budget
from rnq_ep.metrics import gpu_bytes
from rnq_ep.policies import (
    LLEP_MIN_CHUNK,
    PLAIN_EP,
    POLICIES,
    Policy,
    llep_spill,
    place,
    plain_ep_tables,
    route,
    run_policy,
)
from rnq_ep.specs import load_cluster, load_model

HASH_EPLB = next(p for p in POLICIES if p.placement == "eplb" and p.routing == "hash")
LEAST_EPLB = next(p for p in POLICIES if p.placement == "eplb" and p.routing == "least-loaded")
LLEP = next(p for p in POLICIES if p.routing == "llep")


def one_expert_per_gpu(num: int) -> SlotTable:
    return SlotTable.from_arrays(np.arange(num), np.arange(num), np.zeros(num, np.int8), np.ones(num), num, num)


def test_llep_does_not_spill_at_max_over_mean_of_exactly_1_3():
    step = llep_spill(one_expert_per_gpu(4), np.array([1300, 1000, 1000, 700]) * 10)
    assert step.moves == () and step.quotas.tolist() == [13000, 10000, 10000, 7000]


def test_llep_spills_the_excess_down_to_the_mean_onto_the_least_loaded_gpus():
    step = llep_spill(one_expert_per_gpu(4), np.array([10000, 2000, 2000, 2000]))
    assert step.moves == ((0, 1, "bf16"), (0, 2, "bf16"), (0, 3, "bf16"))
    assert step.table.expert.tolist() == [0, 1, 2, 3, 0, 0, 0]
    assert gpu_loads(step.table, step.quotas).tolist() == [4000, 4000, 4000, 4000]


def test_llep_moves_no_chunk_below_1024_tokens():
    # triggered (max/mean 2.0) but every receiver has only 1000 tokens of room
    step = llep_spill(one_expert_per_gpu(4), np.array([6000, 2000, 2000, 2000]))
    assert step.moves == () and step.table.num_slots == 4


def test_llep_stops_when_the_remaining_excess_is_below_a_chunk():
    step = llep_spill(one_expert_per_gpu(4), np.array([7000, 2600, 2400, 2000]))  # mean 3500
    assert step.moves == ((0, 3, "bf16"), (0, 2, "bf16"))
    assert step.quotas.tolist() == [4400, 2600, 2400, 2000, 1500, 1100]  # 900 over the mean stays


def test_llep_weight_moves_cost_one_bf16_expert_each_from_the_overloaded_gpu():
    model, cluster = load_model("tiny"), scaled_cluster(load_cluster("h100x8"), 4)
    step = llep_spill(one_expert_per_gpu(4), np.array([7000, 2600, 2400, 2000]))
    expected = 2 * expert_bytes(model, "bf16") / cluster.intra_node_bytes_per_s  # GPU 0 sends two experts
    assert abs(weight_move_time(model, cluster, list(step.moves)) - expected) < 1e-15


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 20_000), min_size=2, max_size=9))
def test_llep_keeps_every_token_and_never_raises_the_max_load(counts):
    table, counts = one_expert_per_gpu(len(counts)), np.array(counts)
    step = llep_spill(table, counts)
    assert np.array_equal(np.bincount(step.table.expert, weights=step.quotas, minlength=len(counts)), counts)
    assert gpu_loads(step.table, step.quotas).max() <= counts.max()
    spilled = step.quotas[table.num_slots:]
    assert len(spilled) == len(step.moves) and (spilled >= LLEP_MIN_CHUNK).all()


def test_least_loaded_copy_choice_beats_hash_on_skewed_loads():
    # expert 0 has copies on GPUs 0 and 1; GPU 0 also serves the heavy expert 1
    table = SlotTable.from_arrays([0, 0, 1, 1], [0, 1, 0, 2], np.zeros(4, np.int8), [0.5, 1, 0.5, 1], 2, 3)
    counts = np.array([1000, 1000, 0])
    hashed = gpu_loads(table, route(HASH_EPLB, table, counts).quotas)
    least = gpu_loads(table, route(LEAST_EPLB, table, counts).quotas)
    assert hashed.tolist() == [1500, 500] and least.tolist() == [1000, 1000]


def test_least_loaded_is_never_worse_than_hash_on_an_eplb_placement():
    model, cluster = load_model("tiny"), scaled_cluster(load_cluster("h100x8"), 2)
    loads = stats_of(model, [[900, 400, 100, 100, 50, 50, 20, 20], [10, 10, 10, 10, 10, 10, 10, 800]])
    for table, row in zip(place(HASH_EPLB, model, cluster, loads), loads.counts):
        hashed = gpu_loads(table, route(HASH_EPLB, table, np.array(row)).quotas).max()
        least = gpu_loads(table, route(LEAST_EPLB, table, np.array(row)).quotas).max()
        assert least <= hashed


def test_plain_ep_beyond_one_expert_per_gpu_repeats_the_experts_in_groups():
    model, cluster = load_model("tiny"), scaled_cluster(load_cluster("h100x8"), 16)
    table = plain_ep_tables(model, cluster, 1)[0]
    assert table.expert.tolist() == list(range(8)) * 2 and (table.share == 0.5).all()


def test_rnq_spill_starts_from_least_loaded_and_sends_quantized_copies():
    # GPU 0 holds experts 0 and 1 (bf16), GPU 1 expert 2; least-loaded already shares nothing, so the spill acts
    table = SlotTable.from_arrays(np.array([0, 0, 1, 2, 3]), np.array([0, 1, 2, 3, 4]), np.zeros(5, np.int8),
                                  np.ones(5), 4, 5)
    rnq = next(p for p in POLICIES if p.routing == "rnq-spill" and p.spill_fmt == "int4")
    step = route(rnq, table, np.array([9000, 1000, 2000, 2000, 2000]))
    assert step.moves and all(fmt == "int4" for _, _, fmt in step.moves)
    assert (step.table.fmt[table.num_slots:] == 2).all()  # FORMATS.index("int4")
    assert np.array_equal(np.bincount(step.table.expert, weights=step.quotas, minlength=5), [9000, 1000, 2000, 2000, 2000])
    assert gpu_loads(step.table, step.quotas).max() < 10000


def test_rnq_spill_moves_nothing_when_least_loaded_routing_already_balances():
    table = SlotTable.from_arrays(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 2]), np.zeros(4, np.int8),
                                  np.array([0.5, 0.5, 1.0, 1.0]), 4, 3)
    rnq = next(p for p in POLICIES if p.routing == "rnq-spill")
    step = route(rnq, table, np.array([8000, 4000, 4000]))
    assert step.moves == () and gpu_loads(step.table, step.quotas).tolist() == [4000, 4000, 4000, 4000]


def test_every_placement_fits_its_memory():
    model, cluster = load_model("tiny"), scaled_cluster(load_cluster("h100x8"), 2)
    loads = stats_of(model, [[900, 400, 100, 100, 50, 50, 20, 20]])
    budget = plain_ep_budget(model, 2)
    for policy in POLICIES:
        held = gpu_bytes(model, place(policy, model, cluster, loads)[0]).max()
        assert held <= budget * (1 + policy.extra_memory), policy.name


def test_run_policy_adds_the_weight_moves_to_the_layer_time():
    model, cluster = load_model("tiny"), scaled_cluster(load_cluster("h100x8"), 4)
    counts = [70000, 26000, 24000, 20000, 0, 0, 0, 0]  # GPU g holds experts 2g, 2g+1
    window = stats_of(model, [counts])
    run = run_policy(LLEP, model, cluster, [(window, window)], tokens_per_gpu=sum(counts) // 8)
    step = route(LLEP, plain_ep_tables(model, cluster, 1)[0], np.array(counts))
    layer = predict_layer_time(model, cluster, step.table, step.quotas).total_s
    assert run.move_s == weight_move_time(model, cluster, list(step.moves)) > 0
    assert abs(run.layer_s - (layer + run.move_s)) < 1e-12


def test_a_placement_that_cannot_plan_becomes_an_error_run():
    model, cluster = load_model("tiny"), scaled_cluster(load_cluster("h100x8"), 4)
    window = stats_of(model, [[1] * 8])
    broken = Policy("broken", "eplb", "hash", extra_memory=-1.0)
    assert "extra_memory" in run_policy(broken, model, cluster, [(window, window)], 64).error
    assert run_policy(PLAIN_EP, model, cluster, [(window, window)], 64).error == ""
