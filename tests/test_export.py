"""Plan exports for serving systems: SGLang's physical_to_logical_map and vLLM's EPLB state arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rnq_ep.cli import main
from rnq_ep.planner import export_losses, export_sglang, export_vllm, plan_arrays, plan_rnq
from rnq_ep.specs import PlanOptions, load_cluster, load_model, load_stats

LOADS = Path(__file__).resolve().parent.parent / "configs" / "loads"
ARXIV = LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"
GITHUB = LOADS / "olmoe-1b-7b-0924_olmoe-repo_github.json"


@pytest.fixture(scope="module")
def rnq_plan():
    """The README's plan: OLMoE on h100x8 from the arXiv loads, default formats (bf16 + int8)."""
    model = load_model("olmoe-1b-7b")
    plan = plan_rnq(model, load_cluster("h100x8"), load_stats(ARXIV, model), PlanOptions())
    assert any(s.fmt != "bf16" for layer in plan.layers for s in layer.slots)
    return plan


def test_sglang_export_has_the_same_expert_count_on_every_gpu_and_every_plan_copy_in_place(rnq_plan):
    phy2log, _, _ = plan_arrays(rnq_plan)
    exported = np.array(export_sglang(rnq_plan)["physical_to_logical_map"])  # [L, G*P]
    assert exported.shape == phy2log.shape and (exported >= 0).all()
    assert (exported[phy2log >= 0] == phy2log[phy2log >= 0]).all()
    per_gpu = exported.reshape(len(rnq_plan.layers), rnq_plan.cluster.num_gpus, -1)  # [L, G, P]
    assert all(len(set(row.tolist())) == row.size for layer in per_gpu for row in layer), "no expert twice on a GPU"


def test_vllm_export_maps_are_inverse_of_each_other(rnq_plan):
    exported = export_vllm(rnq_plan)
    phy2log = np.array(exported["physical_to_logical_map"])  # [L, P]
    log2phy = np.array(exported["logical_to_physical_map"])  # [L, E, R]
    count = np.array(exported["logical_replica_count"])  # [L, E]
    assert phy2log.tolist() == export_sglang(rnq_plan)["physical_to_logical_map"]
    assert (count.sum(axis=1) == phy2log.shape[1]).all() and (count >= 1).all()
    for layer in range(phy2log.shape[0]):
        for expert in range(count.shape[1]):
            slots = log2phy[layer, expert]
            assert (slots[count[layer, expert]:] == -1).all()
            assert (phy2log[layer, slots[: count[layer, expert]]] == expert).all()


def test_losses_name_the_quantized_copies_the_padding_and_the_missing_layers(rnq_plan):
    quantized = sum(s.fmt != "bf16" for layer in rnq_plan.layers for s in layer.slots)
    lines = export_losses(rnq_plan, "vllm")
    assert len(lines) == 3
    assert f"{quantized} of " in lines[0] and "plain replicas" in lines[0] and "MiB budget" in lines[0]
    assert "extra replicas" in lines[1]
    assert "3 of the model's 16 MoE layers" in lines[2]


@pytest.mark.parametrize("system", ["sglang", "vllm"])
def test_the_readme_plan_exports_with_default_formats_and_warns_what_is_lost(tmp_path, capsys, system):
    export = tmp_path / f"{system}.json"
    argv = ["plan", "--model", "olmoe-1b-7b", "--cluster", "h100x8", "--loads", str(ARXIV), "--eval-loads", str(GITHUB),
            "--out", str(tmp_path / "plan.json"), "--export", f"{system}:{export}"]
    assert main(argv) == 0
    assert "physical_to_logical_map" in json.loads(export.read_text())
    warnings = capsys.readouterr().err.splitlines()
    assert warnings and all(line.startswith(f"rnq-ep plan: warning: --export {system}: ") for line in warnings)
