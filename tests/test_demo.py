"""The demo: its unsharded reference reproduces run_worker's batches, and the whole demo runs end to end."""

from __future__ import annotations

import argparse
import re

import msgspec
import pytest
import ray
import torch

from rnq_ep.cli import main
from rnq_ep.demo import add_demo_arguments, demo_cluster, demo_main, unsharded_outputs, unsharded_run, within_bound
from rnq_ep.runtime.worker import run_worker
from rnq_ep.specs import LayerPlan, LoadStats, Plan, PlanOptions, Slot, encode_json, load_cluster, load_model, load_stats

MODEL = load_model("tiny")


def test_unsharded_outputs_reproduce_a_single_process_run(tmp_path):
    cluster = msgspec.structs.replace(load_cluster("cpu4"), gpus_per_node=1)
    slots = [Slot(gpu=0, expert=e, fmt="bf16", share=1.0) for e in range(MODEL.num_experts)]
    plan = Plan(model=MODEL, cluster=cluster, options=PlanOptions(), layers=[LayerPlan(layer=i, slots=slots) for i in (0, 1)])
    plan_path, loads_path = tmp_path / "plan.json", tmp_path / "loads.json"
    plan_path.write_bytes(encode_json(plan))
    counts = [[50, 40, 30, 20, 10, 5, 2, 1], [1, 1, 1, 1, 1, 1, 1, 90]]
    loads_path.write_bytes(encode_json(LoadStats(counts=counts, num_experts=8, top_k=2, layer_ids=[0, 1])))
    stats = run_worker(0, 1, str(plan_path), tokens=24, steps=2, loads=str(loads_path), seed=3, backend="torch", keep_outputs=True)
    reference = unsharded_outputs(plan, MODEL, load_stats(loads_path), 1, 24, 2, seed=3)
    for step in range(2):
        torch.testing.assert_close(stats[step].output, reference[0][step], rtol=1e-5, atol=1e-5)


def test_quantized_copies_stay_within_the_quantization_bound_and_bf16_ones_match(tmp_path):
    cluster = msgspec.structs.replace(load_cluster("cpu4"), gpus_per_node=1)
    slots = [Slot(gpu=0, expert=e, fmt=("bf16", "int8", "int4")[e % 3], share=1.0) for e in range(MODEL.num_experts)]
    plan = Plan(model=MODEL, cluster=cluster, options=PlanOptions(), layers=[LayerPlan(layer=0, slots=slots)])
    bf16_plan = msgspec.structs.replace(plan, layers=[LayerPlan(layer=0, slots=[msgspec.structs.replace(s, fmt="bf16")
                                                                               for s in slots])])
    plan_path = tmp_path / "plan.json"
    plan_path.write_bytes(encode_json(plan))
    stats = run_worker(0, 1, str(plan_path), tokens=64, steps=2, seed=5, backend="torch", keep_outputs=True)
    reference, bound = unsharded_run(bf16_plan, MODEL, None, 1, 64, 2, seed=5, quantized_plan=plan)
    diff = max((s.output - ref).abs().max().item() for s, ref in zip(stats, reference[0]))
    assert 0 < diff and within_bound(diff, bound), (diff, bound)
    assert bound < 10 * diff, "the bound is the error of these very copies, not a loose envelope"


@pytest.mark.parametrize("flag, value, message", [
    ("--tokens", "-1", "--tokens -1: expected an integer >= 1"),
    ("--steps", "0", "--steps 0: expected an integer >= 1"),
    ("--workers", "1", "--workers 1: expected an integer in [2, 64]"),
    ("--seed", "-2", "--seed -2: expected an integer >= 0"),
    ("--timeout", "nan", "--timeout nan: expected seconds > 0"),
    ("--num-cpus", "0", "--num-cpus 0: expected an integer >= 1"),
])
def test_bad_flags_exit_2_with_one_line_before_any_work(tmp_path, capsys, flag, value, message):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), flag, value]) == 2
    printed = capsys.readouterr()
    assert printed.err == f"rnq-ep demo: error: {message}\n" and printed.out == ""
    assert not out.exists()


def test_demo_cluster_has_one_worker_per_requested_core():
    cluster = demo_cluster(3)
    assert (cluster.name, cluster.num_gpus, cluster.peak_flops) == ("cpu3", 3, load_cluster("cpu4").peak_flops)


@pytest.fixture
def shutdown_ray():
    yield
    ray.shutdown()


@pytest.mark.slow
def test_demo_prints_the_comparison_and_saves_the_png(tmp_path, capsys, shutdown_ray):
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "demo"), "--workers", "2", "--tokens", "16", "--steps", "2", "--num-cpus", "2"])
    assert demo_main(args) == 0
    out = capsys.readouterr().out
    assert "plain EP vs R&Q on 2 CPU workers" in out and "quantized-token fraction" in out
    assert "R&Q vs plain EP: " in out and " by wall clock " in out and "critical path" in out
    assert (tmp_path / "demo" / "tokens_per_worker.png").stat().st_size > 0
    assert (tmp_path / "demo" / "plan_rnq.json").exists()
    plain_diff, rnq_diff = map(float, re.search(r"max \|output - unsharded\|\s*│\s*(\S+)\s*│\s*(\S+)", out).groups())
    assert plain_diff < 1e-4 and rnq_diff < 0.5
    assert "within its quantization bound" in out
