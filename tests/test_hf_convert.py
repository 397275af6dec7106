"""Conversion of tiny transformers models to rnq-ep EP models: logits parity, quantized agreement, bad plans."""

from __future__ import annotations

import copy

import msgspec
import pytest
import torch

from tiny_hf import one_torch_thread, tiny  # noqa: F401  (fixtures; the import skips without transformers)
from rnq_ep import hf, hf_run
from rnq_ep.specs import ClusterSpec, LayerPlan, LoadStats, Plan, PlanOptions, Slot, SpecError
from rnq_ep.textdata import builtin_text, token_batches, tokenize

CONVERTIBLE = sorted(hf.FAMILIES)
ONE_CPU = ClusterSpec(
    name="one-cpu", nodes=1, gpus_per_node=1, hbm_bytes_per_s=1e10, peak_flops=5e10,
    intra_node_bytes_per_s=5e9, inter_node_bytes_per_s=5e9, device="cpu",
)


def one_gpu_plan(model: torch.nn.Module, fmt: str) -> Plan:
    """Every expert once on GPU 0 in `fmt`."""
    spec = hf.model_spec(model, "tiny")
    layers = [
        LayerPlan(layer=layer_id, slots=[Slot(gpu=0, expert=e, fmt=fmt, share=1.0) for e in range(spec.num_experts)])
        for layer_id, _, _ in hf.moe_layers(model)
    ]
    formats = tuple(dict.fromkeys(("bf16", fmt)))
    return Plan(model=spec, cluster=ONE_CPU, options=PlanOptions(formats=formats), layers=layers)


def builtin_batch(rows: int = 4, seq_len: int = 64, offset: int = 0) -> torch.Tensor:
    """[rows, seq_len] byte-level ids of the builtin text from row `offset` on."""
    ids = tokenize(builtin_text()[: 64 * 1024], vocab_size=512)
    return token_batches(ids, batch=offset + rows, seq_len=seq_len, max_tokens=(offset + rows) * seq_len)[0][offset:]


def logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch, use_cache=False).logits


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_converted_model_with_a_bf16_plan_gives_the_original_logits(tiny, family):
    model, batch = tiny(family), builtin_batch()
    converted = hf.convert(copy.deepcopy(model), one_gpu_plan(model, "bf16"), rank=0, world_size=1)
    swapped = [module for module in converted.modules() if isinstance(module, hf.EPExperts)]
    assert len(swapped) == len(hf.moe_layers(model)) and not any(map(hf.is_experts_module, converted.modules()))
    torch.testing.assert_close(logits(converted, batch), logits(model, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", CONVERTIBLE)
def test_all_int8_conversion_keeps_99_percent_top1_agreement(tiny, family):
    model, batch = tiny(family), builtin_batch()
    converted = hf.convert(copy.deepcopy(model), one_gpu_plan(model, "int8"), rank=0, world_size=1)
    agreement = (logits(converted, batch).argmax(-1) == logits(model, batch).argmax(-1)).float().mean()
    assert agreement >= 0.99


def test_experts_with_another_gating_are_refused_with_the_reason(tiny):
    model = copy.deepcopy(tiny("gpt-oss"))
    for _, _, experts in hf.moe_layers(model):
        experts.limit = 5.0  # not GPT-OSS's clamp: no rnq-ep activation computes it
    with pytest.raises(SpecError, match="gpt_oss: its experts compute neither SwiGLU nor GPT-OSS's clamped SwiGLU"):
        hf.convert(model, one_gpu_plan(model, "bf16"), rank=0, world_size=1)


def test_plan_for_another_shape_is_rejected(tiny):
    plan = one_gpu_plan(tiny("olmoe"), "bf16")
    with pytest.raises(SpecError, match="plan: model num_experts=16 but the transformers model has 8"):
        hf.convert(copy.deepcopy(tiny("mixtral")), plan, rank=0, world_size=1)


def test_plan_missing_a_moe_layer_is_rejected(tiny):
    model = tiny("mixtral")
    plan = one_gpu_plan(model, "bf16")
    partial = Plan(model=plan.model, cluster=plan.cluster, options=plan.options, layers=plan.layers[:2])
    with pytest.raises(SpecError, match=r"no layer plan for MoE layers \[2\]"):
        hf.convert(copy.deepcopy(model), partial, rank=0, world_size=1)


def test_greedy_generation_on_a_bf16_conversion_equals_the_original(tiny):
    model, prompt = tiny("qwen3-moe"), builtin_batch(rows=2, seq_len=16)
    converted = hf.convert(copy.deepcopy(model), one_gpu_plan(model, "bf16"), rank=0, world_size=1)
    report = hf_run.generate_greedy(converted, prompt, new_tokens=6)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(report.tokens, expected)
    assert len(report.balancedness) == len(hf.moe_layers(model))
    assert all(value == 1.0 for value in report.balancedness)  # one GPU is always balanced
    assert report.tokens_per_s > 0


def test_generation_needs_a_converted_model(tiny):
    with pytest.raises(SpecError, match="call convert"):
        hf_run.generate_greedy(tiny("mixtral"), builtin_batch(rows=1, seq_len=8), new_tokens=1)


def generate_on_rank(rank: int, world_size: int, plan: Plan) -> tuple[bool, list[float]]:
    """(tokens equal the unconverted model's greedy tokens, balancedness per layer) of this rank."""
    torch.set_num_threads(1)
    report = hf_run.run_on_rank("tiny-mixtral", plan, rank, world_size, batch=2, prompt_len=16, new_tokens=4)
    prompt = report.tokens[:, :16]
    with torch.no_grad():
        expected = hf.tiny_model("mixtral").generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return torch.equal(report.tokens, expected), report.balancedness


def test_run_on_one_rank_generates_the_original_tokens(tiny):
    same, balancedness = generate_on_rank(0, 1, one_gpu_plan(tiny("mixtral"), "bf16"))
    assert same and balancedness == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_two_rank_greedy_generation_follows_the_original_model():
    from gloo import run_ranks

    from rnq_ep.planner import plan_plain_ep

    model = hf.tiny_model("mixtral")
    spec, cluster = hf.model_spec(model, "tiny-mixtral"), msgspec.structs.replace(ONE_CPU, gpus_per_node=2)
    stats = LoadStats(counts=[[1] * 8] * 3, num_experts=8, top_k=2)
    results = run_ranks(generate_on_rank, 2, plan_plain_ep(spec, cluster, stats))
    assert all(same for same, _ in results)
    assert all(len(balancedness) == 3 and min(balancedness) >= 1.0 for _, balancedness in results)
