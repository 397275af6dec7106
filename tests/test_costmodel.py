"""costmodel: roofline compute + all-to-all time per layer, sanity properties."""

import msgspec
import numpy as np
import pytest
from handmade_plans import plain_ep_slots, plan_of, stats_of

from rnq_ep.balance import SlotTable
from rnq_ep.costmodel import predict_layer_time, predict_plan, scale_counts, weight_move_time
from rnq_ep.specs import load_cluster, load_model

OLMOE = load_model("olmoe-1b-7b")  # 64 experts, top-8
DSV3 = load_model("deepseek-v3")
H100X32 = load_cluster("h100x32")  # 4 nodes x 8


def plain_table(model, cluster, fmt="bf16"):
    plan = plan_of(model, cluster, [plain_ep_slots(model, cluster, fmt)])
    return SlotTable.from_layer(plan.layers[0], cluster.num_gpus, model.num_experts)


def test_layer_time_grows_with_tokens():
    table = plain_table(OLMOE, H100X32)
    times = [predict_layer_time(OLMOE, H100X32, table, np.full(64, n)).total_s for n in (1, 64, 4096, 65536)]
    assert times == sorted(times) and times[0] < times[-1]


def test_int4_copies_are_faster_than_bf16_at_decode():
    cluster = load_cluster("h100x8")
    tokens = np.full(DSV3.num_experts, 4)
    bf16 = predict_layer_time(DSV3, cluster, plain_table(DSV3, cluster), tokens)
    int4 = predict_layer_time(DSV3, cluster, plain_table(DSV3, cluster, "int4"), tokens)
    assert (bf16.hbm_s > bf16.flop_s).all()  # decode is memory bound
    assert int4.total_s < 0.5 * bf16.total_s


def test_large_prefill_steps_are_compute_bound():
    cluster = load_cluster("h100x8")
    layer = predict_layer_time(DSV3, cluster, plain_table(DSV3, cluster), np.full(DSV3.num_experts, 4096))
    assert (layer.flop_s > layer.hbm_s).all()


def test_inter_node_all_to_all_is_slower_than_intra_node():
    one_node = msgspec.structs.replace(H100X32, nodes=1, gpus_per_node=32)
    tokens = np.full(64, 4096)
    multi = predict_layer_time(OLMOE, H100X32, plain_table(OLMOE, H100X32), tokens)
    single = predict_layer_time(OLMOE, one_node, plain_table(OLMOE, one_node), tokens)
    np.testing.assert_allclose(multi.compute_s, single.compute_s)
    assert multi.comm_s.min() > single.comm_s.max()


def test_plain_ep_on_uniform_load_gives_every_gpu_the_same_time():
    layer = predict_layer_time(OLMOE, H100X32, plain_table(OLMOE, H100X32), np.full(64, 1000))
    np.testing.assert_allclose(layer.compute_s, layer.compute_s[0])
    np.testing.assert_allclose(layer.comm_s, layer.comm_s[0])


def test_a_hot_expert_makes_the_layer_slower_than_uniform_load():
    table = plain_table(OLMOE, H100X32)
    uniform = np.full(64, 1000)
    skewed = uniform.copy()
    skewed[0], skewed[2] = 1990, 10  # GPU 0 hot, GPU 1 nearly idle
    slow = predict_layer_time(OLMOE, H100X32, table, skewed).total_s
    assert slow > predict_layer_time(OLMOE, H100X32, table, uniform).total_s


def test_idle_copies_read_no_weights():
    cluster = load_cluster("h100x8")
    table = plain_table(DSV3, cluster)
    tokens = np.zeros(DSV3.num_experts)
    tokens[:32] = 1  # only GPU 0's experts get tokens
    layer = predict_layer_time(DSV3, cluster, table, tokens)
    assert layer.compute_s[1:].max() == 0.0 < layer.compute_s[0]


def test_scale_counts_rescales_to_tokens_per_gpu_times_gpus_times_top_k():
    scaled = scale_counts(np.array([3, 1] * 32), OLMOE, num_gpus=8, tokens_per_gpu=100)
    assert abs(int(scaled.sum()) - 100 * 8 * 8) <= 64
    assert scaled[0] == 3 * scaled[1]


def test_predict_plan_gives_one_time_per_layer_and_grows_with_tokens_per_gpu():
    cluster = load_cluster("h100x8")
    plan = plan_of(OLMOE, cluster, [plain_ep_slots(OLMOE, cluster)] * 2)
    loads = stats_of(OLMOE, [[10] * 64, [100] + [10] * 63])
    small = predict_plan(plan, loads, tokens_per_gpu=256)
    large = predict_plan(plan, loads, tokens_per_gpu=8192)
    assert small.shape == (2,) and (large > small).all()
    assert predict_plan(plan, loads, split="shares")[1] == pytest.approx(predict_plan(plan, loads)[1])


def test_weight_moves_across_nodes_take_longer_than_within_a_node():
    intra = weight_move_time(OLMOE, H100X32, [(0, 1, "bf16")])
    inter = weight_move_time(OLMOE, H100X32, [(0, 8, "bf16")])
    assert 0 < intra < inter
    assert weight_move_time(OLMOE, H100X32, []) == 0.0
    assert weight_move_time(OLMOE, H100X32, [(0, 8, "int4")]) < inter


def test_every_layer_step_pays_the_collectives_fixed_latency_once_per_collective():
    from rnq_ep.costmodel import COLLECTIVES_PER_STEP, collective_latency

    table = plain_table(OLMOE, H100X32)
    no_latency = msgspec.structs.replace(H100X32, intra_node_latency_s=0.0, inter_node_latency_s=0.0)
    for tokens in (1, 4096):
        with_latency = predict_layer_time(OLMOE, H100X32, table, np.full(64, tokens))
        without = predict_layer_time(OLMOE, no_latency, table, np.full(64, tokens))
        assert collective_latency(H100X32) == COLLECTIVES_PER_STEP * H100X32.inter_node_latency_s  # spans 4 nodes
        np.testing.assert_allclose(with_latency.comm_s - without.comm_s, collective_latency(H100X32))
        assert with_latency.total_s == pytest.approx(without.total_s + collective_latency(H100X32))
    one_node = load_cluster("h100x8")
    assert collective_latency(one_node) == COLLECTIVES_PER_STEP * one_node.intra_node_latency_s


def test_at_decode_on_64_gpus_latency_is_about_half_of_a_layer_step():
    from rnq_ep.costmodel import collective_latency

    cluster = load_cluster("h200x64")  # 4 DeepSeek-V3 experts per GPU: 0.18 GB of weights, ~37 us of HBM
    layer = predict_layer_time(DSV3, cluster, plain_table(DSV3, cluster), np.full(DSV3.num_experts, 2))
    assert 0.4 < collective_latency(cluster) / layer.total_s < 0.6  # 75 us of ~150 us
