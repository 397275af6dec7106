"""GPT-OSS experts in rnq-ep: the clamped SwiGLU, the canonical layout with biases, and the torch-only backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_hf import one_torch_thread, tiny  # noqa: F401  (fixtures; the import skips without transformers)
from rnq_ep import hf
from rnq_ep.balance import SlotTable
from rnq_ep.experts import LocalExperts
from rnq_ep.kernels.reference import gated, grouped_swiglu_reference


def test_swiglu_oai_equals_gpt_oss_gating_on_clamped_values(tiny):
    experts = hf.moe_layers(tiny("gpt-oss"))[0][2]
    interleaved = torch.randn(50, 2 * 96, generator=torch.Generator().manual_seed(0)) * 10  # beyond the limit 7
    canonical = torch.cat([interleaved[:, 0::2], interleaved[:, 1::2]], dim=1)  # gate columns, then up
    torch.testing.assert_close(gated(canonical, "swiglu-oai"), experts._apply_gate(interleaved), rtol=0, atol=0)


def test_ep_weights_with_the_reference_give_each_gpt_oss_expert(tiny):
    experts = hf.moe_layers(tiny("gpt-oss"))[1][2]
    w_gate_up, w_down, gate_up_bias, down_bias = hf.ep_weights(experts)
    assert tuple(w_gate_up.shape) == (8, 192, 64) and tuple(w_down.shape) == (8, 64, 96)
    assert gate_up_bias.abs().min() > 0 and tuple(down_bias.shape) == (8, 64)  # tiny GPT-OSS draws its biases
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for expert in (0, 5):
            expected = experts(x, torch.full((7, 1), expert), torch.ones(7, 1))  # f_e(x)
            got = grouped_swiglu_reference(
                x, w_gate_up[expert : expert + 1], w_down[expert : expert + 1], torch.tensor([0, 7]),
                activation="swiglu-oai", gate_up_bias=gate_up_bias[expert : expert + 1],
                down_bias=down_bias[expert : expert + 1],
            )
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_model_spec_names_the_gpt_oss_activation(tiny):
    assert hf.model_spec(tiny("gpt-oss"), "tiny").activation == "swiglu-oai"
    assert hf.model_spec(tiny("mixtral"), "tiny").activation == "silu"


def one_gpu_table(num_experts: int) -> SlotTable:
    """Every expert once on GPU 0 in bf16."""
    return SlotTable(
        gpu=np.zeros(num_experts, np.int64), expert=np.arange(num_experts), fmt=np.zeros(num_experts, np.int8),
        share=np.ones(num_experts), num_gpus=1, num_experts=num_experts,
    )


def test_local_experts_run_swiglu_oai_with_biases_on_torch_when_auto():
    gen = torch.Generator().manual_seed(2)
    w_gate_up, w_down = torch.randn(4, 16, 8, generator=gen), torch.randn(4, 8, 8, generator=gen)
    gate_up_bias, down_bias = torch.randn(4, 16, generator=gen), torch.randn(4, 8, generator=gen)
    experts = LocalExperts(one_gpu_table(4), 0, w_gate_up, w_down, "auto", "swiglu-oai", gate_up_bias, down_bias)
    assert experts.backend == "torch"
    x, offsets, weight = torch.randn(10, 8, generator=gen), torch.tensor([0, 3, 3, 7, 10]), torch.rand(10, generator=gen)
    expected = grouped_swiglu_reference(
        x, w_gate_up.bfloat16(), w_down.bfloat16(), offsets, weight, "swiglu-oai", gate_up_bias, down_bias
    )  # bf16 is the stored format of the one-GPU table
    torch.testing.assert_close(experts(x, offsets, weight), expected, rtol=1e-6, atol=1e-6)


def test_triton_backend_refuses_swiglu_oai():
    w_gate_up, w_down = torch.zeros(2, 16, 8), torch.zeros(2, 8, 8)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        LocalExperts(one_gpu_table(2), 0, w_gate_up, w_down, "triton", "swiglu-oai")


def test_unknown_activation_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown expert activation 'gelu'.*swiglu-oai"):
        LocalExperts(one_gpu_table(2), 0, torch.zeros(2, 16, 8), torch.zeros(2, 8, 8), "auto", "gelu")


def test_epmoe_rejects_a_bias_of_the_wrong_shape(tiny):
    from test_hf_convert import one_gpu_plan

    from rnq_ep.layer import EPMoE

    model = tiny("gpt-oss")
    plan = one_gpu_plan(model, "bf16")
    w_gate_up, w_down, gate_up_bias, _ = hf.ep_weights(hf.moe_layers(model)[0][2])
    with pytest.raises(ValueError, match=r"down_bias has shape \(8, 96\), model 'tiny' expects \[8, 64\]"):
        EPMoE(plan.model, plan.layers[0], 1, 0, None, w_gate_up, w_down, torch.zeros(8, 64), activation="swiglu-oai",
              gate_up_bias=gate_up_bias, down_bias=torch.zeros(8, 96))
