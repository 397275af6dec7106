"""transformers integration: tiny family builders, expert access, model loading and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_hf import one_torch_thread, tiny  # noqa: F401  (fixtures; the import skips without transformers)
from rnq_ep import hf, hf_run
from rnq_ep.specs import SpecError

FAMILIES = sorted(hf.FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_has_moe_layers_with_its_expert_count(tiny, family):
    model = tiny(family)
    layers = hf.moe_layers(model)
    spec = hf.model_spec(model, f"tiny-{family}")
    assert spec.num_layers == len(layers) >= 2
    assert 8 <= spec.num_experts <= 16
    assert spec.hidden_size == 64
    assert all(module.gate_up_proj.shape[0] == spec.num_experts for _, _, module in layers)


def test_tiny_model_is_reproducible_from_its_seed():
    first, second = hf.tiny_model("olmoe", seed=3), hf.tiny_model("olmoe", seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_forward_equals_the_experts_module_on_one_expert(tiny, family):
    experts = hf.moe_layers(tiny(family))[0][2]
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    expert = 3
    with torch.no_grad():
        # routing every row to `expert` with weight 1 makes the module compute f_e(x)
        expected = experts(x, torch.full((7, 1), expert), torch.ones(7, 1))
        gate_up, down = hf.canonical_weights(experts, expert)
        got = hf.expert_forward(experts, expert, x, gate_up, down)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_canonical_weights_are_output_by_input_for_transposed_gpt_oss(tiny):
    experts = hf.moe_layers(tiny("gpt-oss"))[0][2]
    gate_up, down = hf.canonical_weights(experts, 0)
    intermediate = experts.down_proj.shape[1]
    assert tuple(gate_up.shape) == (2 * intermediate, 64)
    assert tuple(down.shape) == (64, intermediate)


def test_deepseek_v3_dense_first_layer_is_not_a_moe_layer(tiny):
    assert [layer_id for layer_id, _, _ in hf.moe_layers(tiny("deepseek-v3"))] == [1, 2]


def test_unknown_family_names_the_known_ones():
    with pytest.raises(SpecError, match=r"unknown model family 'llama4'.*mixtral"):
        hf.load_model("tiny-llama4")


def test_dense_model_is_rejected_as_not_moe():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(SpecError, match=r"not a MoE model \(model_type='llama'\)"):
        hf.moe_layers(AutoModelForCausalLM.from_config(config))


def test_missing_model_folder_is_rejected(tmp_path):
    with pytest.raises(SpecError, match="no such folder"):
        hf.load_model(str(tmp_path / "absent"))


def test_model_folder_without_weights_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(SpecError, match=r"no weights \(\*\.safetensors"):
        hf.load_model(str(tmp_path))


def test_model_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SpecError, match="no config.json"):
        hf.load_model(str(tmp_path))


def test_model_folder_with_unreadable_weights_is_rejected(tmp_path):
    hf.tiny_config("mixtral").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SpecError, match="transformers cannot load it"):
        hf.load_model(str(tmp_path))


def test_model_folder_missing_expert_tensors_is_rejected_not_filled_randomly(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny("mixtral").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {name: w for name, w in weights.items() if "layers.2.block_sparse_moe.experts" not in name}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SpecError, match=r"weight files lack 2 tensor\(s\) of the model: model.layers.2.mlp.experts"):
        hf.load_model(str(tmp_path))


def test_saved_tiny_model_loads_with_the_same_weights(tiny, tmp_path):
    model = tiny("qwen2-moe")
    model.save_pretrained(tmp_path)
    loaded, tokenizer, name = hf.load_model(str(tmp_path))
    assert tokenizer is None and name == tmp_path.name
    ids = torch.arange(20)[None] % 512
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_driver_prompts_are_the_rows_each_rank_would_cut_itself(tmp_path):
    from rnq_ep.textdata import builtin_text, token_batches, tokenize

    rows = hf_run.prompt_rows("tiny-mixtral", rows=3, prompt_len=8)
    ids = tokenize(builtin_text(), hf.tiny_model("mixtral").config.vocab_size)
    assert torch.equal(rows, token_batches(ids, 3, 8, 24)[0]) and rows.shape == (3, 8)
    with pytest.raises(SpecError, match="no config.json"):
        hf_run.prompt_rows(str(tmp_path), rows=2, prompt_len=8)
