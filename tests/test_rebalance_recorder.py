"""The load recorder: layers add their routed counts on the device, the window slides, a snapshot sums it."""

import numpy as np
import pytest
import torch

from rnq_ep.layer import EPMoE
from rnq_ep.rebalance.recorder import LoadRecorder
from rnq_ep.rebalance.rebalancer import RebalanceHealth
from rnq_ep.runtime.inputs import random_layer_weights
from rnq_ep.specs import LayerPlan, Slot, load_model

MODEL = load_model("tiny")  # 8 experts, top-2


def test_the_window_keeps_only_the_last_steps():
    recorder = LoadRecorder(num_layers=1, num_experts=3, window=2)
    for step in range(3):
        recorder.current[0, step] += 10 * (step + 1)
        recorder.end_step()
        assert recorder.full == (step >= 1)
        assert not recorder.current.any()
    assert recorder.snapshot().tolist() == [[0, 20, 30]]  # step 0 slid out


def test_an_attached_layer_adds_the_experts_it_routed_to():
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, 3)
    plan = LayerPlan(layer=0, slots=[Slot(gpu=0, expert=e, fmt="bf16", share=1.0) for e in range(MODEL.num_experts)])
    layer = EPMoE(MODEL, plan, 1, 0, None, w_gate_up, w_down, router, backend="torch")
    recorder = LoadRecorder(1, MODEL.num_experts, window=4)
    recorder.attach([layer])
    ids = torch.tensor([[0, 1], [1, 2], [1, 7]])
    for _ in range(2):
        layer.forward_routed(torch.randn(3, MODEL.hidden_size), ids, torch.full((3, 2), 0.5))
        recorder.end_step()
    assert recorder.snapshot()[0].tolist() == (2 * np.bincount(ids.reshape(-1), minlength=MODEL.num_experts)).tolist()


def test_a_recorder_for_other_layers_or_an_empty_window_is_refused():
    with pytest.raises(ValueError, match="window must be >= 1"):
        LoadRecorder(1, 8, window=0)
    with pytest.raises(ValueError, match="recorder has 2 layers, got 0"):
        LoadRecorder(2, 8, window=1).attach([])


def test_the_summary_lists_the_stall_of_each_switch():
    health = RebalanceHealth(layers_switched=2, bytes_moved=3_000_000, stalls=[(12, 0, 0.0031), (13, 1, 0.0125)])
    line = health.summary()
    assert "3.00 MB moved" in line and "step 12 layer 0 3.1 ms, step 13 layer 1 12.5 ms" in line
    assert "none" in RebalanceHealth().summary()
