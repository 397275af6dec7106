"""runtime/inputs.py: each routed expert is seeded on its own, so a rank builds only its own copies."""

from __future__ import annotations

import torch

from rnq_ep.layer import EPMoE
from rnq_ep.runtime.inputs import random_layer_weights, seeded_expert, seeded_experts
from rnq_ep.specs import LayerPlan, Slot, load_model

MODEL = load_model("tiny")  # H 96, I 160, 8 experts, top-2
SEED = 3


def test_a_layers_experts_are_the_experts_drawn_alone():
    w_gate_up, w_down, _ = random_layer_weights(MODEL, 1, SEED)
    for expert in (0, 5):
        gate_up, down = seeded_expert(MODEL, 1, SEED, expert)
        assert torch.equal(w_gate_up[expert], gate_up) and torch.equal(w_down[expert], down)


def test_experts_differ_by_expert_layer_and_seed():
    first = seeded_expert(MODEL, 0, SEED, 0)[0]
    for other in (seeded_expert(MODEL, 0, SEED, 1), seeded_expert(MODEL, 1, SEED, 0), seeded_expert(MODEL, 0, SEED + 1, 0)):
        assert not torch.equal(first, other[0])


def test_a_layer_from_its_own_experts_equals_the_layer_from_full_tensors():
    slots = [Slot(gpu=0, expert=e, fmt=("bf16", "int8", "int4")[e % 3], share=1.0) for e in range(MODEL.num_experts)]
    layer_plan = LayerPlan(layer=0, slots=slots)
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    full = EPMoE(MODEL, layer_plan, 1, 0, None, w_gate_up, w_down, router, backend="torch")
    own = EPMoE(MODEL, layer_plan, 1, 0, None, seeded_experts(MODEL, 0, SEED), None, router, backend="torch")
    x = torch.randn(24, MODEL.hidden_size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(own(x), full(x), rtol=0, atol=0)
