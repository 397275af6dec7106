"""Bad inputs to specs loaders: each raises SpecError whose message names the file, key and expectation."""

import json

import pytest

from rnq_ep.specs import SpecError, load_cluster, load_model, load_stats

TINY_TOML = """name = "t"
num_layers = 2
num_experts = 4
top_k = 2
hidden_size = 8
moe_intermediate_size = 16
"""
CLUSTER_TOML = """name = "c"
nodes = 1
gpus_per_node = 8
hbm_bytes_per_s = 3e12
peak_flops = 1e15
intra_node_bytes_per_s = 4e11
inter_node_bytes_per_s = 5e10
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def loads_file(tmp_path, **overrides):
    body = {"counts": [[1, 2, 3, 4], [4, 3, 2, 1]], "num_experts": 4, "top_k": 2, **overrides}
    return write(tmp_path, "loads.json", json.dumps(body))


def test_unknown_key_in_model_is_named(tmp_path):
    path = write(tmp_path, "m.toml", TINY_TOML + "num_expertz = 3\n")
    with pytest.raises(SpecError, match=r"m\.toml.*num_expertz"):
        load_model(str(path))


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path):
    path = write(tmp_path, "m.toml", TINY_TOML.replace("num_experts = 4", 'num_experts = "four"'))
    with pytest.raises(SpecError, match=r"m\.toml.*int.*num_experts"):
        load_model(str(path))


def test_top_k_above_experts_in_model_is_rejected(tmp_path):
    path = write(tmp_path, "m.toml", TINY_TOML.replace("top_k = 2", "top_k = 5"))
    with pytest.raises(SpecError, match=r"top_k=5 exceeds num_experts=4"):
        load_model(str(path))


def test_top_k_above_experts_in_loads_is_rejected(tmp_path):
    with pytest.raises(SpecError, match=r"top_k: must be in \[1, num_experts=4\], got 9"):
        load_stats(loads_file(tmp_path, top_k=9))


def test_negative_count_names_layer_and_expert(tmp_path):
    with pytest.raises(SpecError, match=r"counts\[1\]\[2\]: -2 is not a token count in \[0, 2\*\*48\]"):
        load_stats(loads_file(tmp_path, counts=[[1, 2, 3, 4], [4, 3, -2, 1]]))


def test_nan_count_is_rejected(tmp_path):
    path = write(tmp_path, "loads.json", '{"counts": [[1, NaN, 3, 4]], "num_experts": 4, "top_k": 2}')
    with pytest.raises(SpecError, match=r"loads\.json: not valid JSON: .*byte 16.*NaN and Infinity are not JSON numbers"):
        load_stats(path)


def test_fractional_count_is_rejected_as_not_an_integer(tmp_path):
    with pytest.raises(SpecError, match=r"Expected `int`.*counts\[0\]\[1\]"):
        load_stats(loads_file(tmp_path, counts=[[1, 2.5, 3, 4]]))


def test_ragged_counts_row_names_the_row(tmp_path):
    with pytest.raises(SpecError, match=r"counts\[1\]: has 3 experts, expected num_experts=4"):
        load_stats(loads_file(tmp_path, counts=[[1, 2, 3, 4], [1, 2, 3]]))


def test_counts_for_another_expert_count_than_the_model_are_rejected(tmp_path):
    with pytest.raises(SpecError, match=r"num_experts=4 but model 'olmoe-1b-7b' has 64"):
        load_stats(loads_file(tmp_path), load_model("olmoe-1b-7b"))


def test_more_load_layers_than_model_layers_are_rejected(tmp_path):
    counts = [[1, 2, 3, 4, 5, 6, 7, 8]] * 3
    path = loads_file(tmp_path, counts=counts, num_experts=8)
    with pytest.raises(SpecError, match=r"counts has 3 layers but model 'tiny' has 2 MoE layers"):
        load_stats(path, load_model("tiny"))


def test_unknown_model_name_lists_the_shipped_ones():
    with pytest.raises(SpecError, match=r"unknown model 'gpt-9'.*'deepseek-v3'"):
        load_model("gpt-9")


def test_unknown_cluster_name_lists_the_shipped_ones():
    with pytest.raises(SpecError, match=r"unknown cluster 'h100x9'.*'h100x8'"):
        load_cluster("h100x9")


def test_empty_loads_file_is_rejected(tmp_path):
    with pytest.raises(SpecError, match=r"loads\.json: file is empty"):
        load_stats(write(tmp_path, "loads.json", ""))


def test_empty_counts_are_rejected(tmp_path):
    with pytest.raises(SpecError, match=r"counts: empty"):
        load_stats(loads_file(tmp_path, counts=[]))


def test_missing_loads_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.json: no such file"):
        load_stats(tmp_path / "nope.json")


def test_a_count_too_large_for_exact_sums_is_rejected_naming_its_place(tmp_path):
    with pytest.raises(SpecError, match=r"counts\[0\]\[0\]: 1000000000000000000000000000000 is not a token count"):
        load_stats(loads_file(tmp_path, counts=[[10**30, 2, 3, 4], [4, 3, 2, 1]]))


def test_layer_ids_must_increase(tmp_path):
    with pytest.raises(SpecError, match=r"layer_ids\[1\]: 3, expected increasing decoder layer ids >= 0"):
        load_stats(loads_file(tmp_path, layer_ids=[3, 3]))


def test_layer_ids_beyond_the_model_are_rejected(tmp_path):
    path = loads_file(tmp_path, counts=[[1] * 8, [2] * 8], num_experts=8, layer_ids=[0, 99])
    with pytest.raises(SpecError, match=r"layer_ids\[1\]: 99 is not a decoder layer of model 'tiny' \(2 MoE layers\)"):
        load_stats(path, load_model("tiny"))


def test_a_model_wider_than_the_limit_is_rejected_naming_key_and_limit(tmp_path):
    path = write(tmp_path, "m.toml", TINY_TOML.replace("hidden_size = 8", "hidden_size = 4000000000"))
    with pytest.raises(SpecError, match=r"m\.toml: model 't': hidden_size must be <= 1048576, got 4000000000"):
        load_model(str(path))


def test_a_cluster_of_more_gpus_than_the_limit_is_rejected(tmp_path):
    text = CLUSTER_TOML.replace("gpus_per_node = 8", "gpus_per_node = 100000000")
    with pytest.raises(SpecError, match=r"1 nodes x 100000000 GPUs is more than 8192 GPUs"):
        load_cluster(str(write(tmp_path, "c.toml", text)))
