"""Ray runtime: outputs equal the unsharded model, a killed worker is named, restarts replay, bad clusters fail fast.

One local Ray cluster (2 CPUs, workers at half a CPU) serves the module; every job starts and
tears down its own worker group. Plans are bf16 with replicas of the hot expert, so sharded
outputs equal the dense model in fp32 up to summation order.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import ray
import torch
from gloo import run_ranks
from ray.util.placement_group import placement_group, remove_placement_group

from rnq_ep.demo import unsharded_outputs
from rnq_ep.memory import plain_ep_budget
from rnq_ep.planner import plan_rnq
from rnq_ep.runtime import ray_cluster
from rnq_ep.runtime import ray_cli
from rnq_ep.runtime.ray_cli import add_ray_arguments, ray_main, shown
from rnq_ep.runtime.ray_cluster import ClusterError, WorkerInfo, connect, placement_for, torchrun_env
from rnq_ep.runtime.ray_driver import WorkerFailed, make_job, run_job
from rnq_ep.runtime.torchrun import add_run_arguments
from rnq_ep.runtime.worker import run_worker
from rnq_ep.specs import LayerPlan, LoadStats, Plan, PlanOptions, Slot, SpecError, encode_json, load_cluster, load_model, load_stats

MODEL = load_model("tiny")
REPO = Path(__file__).resolve().parent.parent
TOKENS, STEPS = 16, 2


def bf16_plan(num_gpus: int, nodes: int = 1, device: str = "cpu") -> Plan:
    """Experts round-robin over the GPUs, expert 0 (the hot one) on every GPU; two layers."""
    cluster = msgspec.structs.replace(load_cluster("cpu4"), nodes=nodes, gpus_per_node=num_gpus // nodes, device=device)
    slots = sorted([(e % num_gpus, e, 1.0) for e in range(1, MODEL.num_experts)] + [(g, 0, 1 / num_gpus) for g in range(num_gpus)])
    layer_slots = [Slot(gpu=g, expert=e, fmt="bf16", share=s) for g, e, s in slots]
    room = PlanOptions(memory_budget=plain_ep_budget(MODEL, 1))  # every expert fits on every GPU: a valid plan
    return Plan(model=MODEL, cluster=cluster, options=room, layers=[LayerPlan(layer=i, slots=layer_slots) for i in (0, 1)])


def write_job_files(folder: Path, num_gpus: int) -> tuple[str, str]:
    """(plan path, loads path): a bf16 plan for num_gpus workers and loads where expert 0 dominates."""
    plan, loads = folder / f"plan{num_gpus}.json", folder / "loads.json"
    plan.write_bytes(encode_json(bf16_plan(num_gpus)))
    counts = [[900, 50, 40, 30, 20, 10, 5, 1], [10, 10, 10, 10, 10, 10, 10, 930]]
    loads.write_bytes(encode_json(LoadStats(counts=counts, num_experts=8, top_k=2, layer_ids=[0, 1])))
    return str(plan), str(loads)


def assert_matches_unsharded(stats, plan_path: str, loads_path: str) -> None:
    """Every rank has every step once, in order, with the unsharded model's output."""
    world, steps = len(stats), len(stats[0])
    reference = unsharded_outputs(bf16_plan(world), MODEL, load_stats(loads_path), world, TOKENS, steps, seed=0)
    for rank in range(world):
        assert [s.step for s in stats[rank]] == list(range(steps))
        for step in range(steps):
            torch.testing.assert_close(stats[rank][step].output, reference[rank][step], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def local_ray():
    connect(num_cpus=2)
    yield
    ray.shutdown()


def job_of(tmp_path: Path, num_gpus: int):
    plan, loads = write_job_files(tmp_path, num_gpus)
    return make_job(plan, loads, tokens=TOKENS, steps=STEPS, backend="torch", keep_outputs=True, timeout_s=60), plan, loads


def kill_rank_once(rank: int, when: str = "running"):
    """An event sink that kills `rank`'s actor once, in the first attempt: when it runs, or when step 0 is done ("step")."""
    def on_event(event):
        if event.kind == when and event.attempt == 0 and (when != "step" or event.step_stats[0][0].step == 0):
            ray.kill(event.actors[rank])
    return on_event


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_workers_produce_the_unsharded_outputs_and_report_each_step_live(local_ray, tmp_path, workers):
    job, plan, loads = job_of(tmp_path, workers)
    events = []
    result = run_job(job, on_event=events.append)
    assert result.restarts == 0 and [w.rank for w in result.workers] == list(range(workers))
    assert_matches_unsharded(result.stats, plan, loads)
    live = [event for event in events if event.kind == "step"]
    assert [[s.step for s in event.step_stats[0]] for event in live] == [[step] * workers for step in range(STEPS)]
    assert events[-1].kind == "done"


@pytest.mark.slow
def test_a_killed_worker_stops_the_job_naming_its_rank_and_node(local_ray, tmp_path):
    job, _, _ = job_of(tmp_path, 2)
    with pytest.raises(WorkerFailed, match=r"worker rank 1 \(actor \w+, pid \d+ on node \w+ at [\d.]+\) of 2 died while running: .*ray.kill"):
        run_job(job, on_event=kill_rank_once(1))


@pytest.mark.slow
def test_a_restart_replays_only_the_unfinished_steps_with_the_same_outputs(local_ray, tmp_path):
    job, plan, loads = job_of(tmp_path, 2)
    job = dataclasses.replace(job, options=msgspec.structs.replace(job.options, steps=4))  # the driver feeds 2 steps ahead: steps 2 and 3 wait for it, so the kill lands mid-run
    events = []

    def on_event(event):
        events.append(event.kind)
        kill_rank_once(0, when="step")(event)

    result = run_job(job, max_restarts=1, on_event=on_event)
    assert result.restarts == 1 and "failed" in events and events[-1] == "done"
    assert result.first_steps[0] == 0 and result.first_steps[1] in (1, 2)
    assert events.count("step") == 4
    assert_matches_unsharded(result.stats, plan, loads)


@pytest.mark.slow
def test_rebalancing_on_ray_workers_replans_after_a_drift(local_ray, tmp_path):
    before = [40, 20, 10, 6, 6, 6, 6, 6]
    cluster = msgspec.structs.replace(load_cluster("cpu4"), name="cpu2", gpus_per_node=2)
    plan = plan_rnq(MODEL, cluster, LoadStats(counts=[before] * 2, num_experts=8, top_k=2), PlanOptions(formats=("bf16", "int8", "int4")))
    paths = {name: tmp_path / f"{name}.json" for name in ("plan", "before", "after")}
    paths["plan"].write_bytes(encode_json(plan))
    for name, counts in (("before", before), ("after", before[::-1])):
        paths[name].write_bytes(encode_json(LoadStats(counts=[counts] * 2, num_experts=8, top_k=2)))
    job = make_job(str(paths["plan"]), str(paths["before"]), loads_after=str(paths["after"]), drift_step=2, tokens=32,
                   steps=8, seed=7, backend="torch", timeout_s=60, rebalance_interval=2, rebalance_horizon=10_000)
    stats = run_job(job).stats
    final = [rank_stats[-1].rebalance for rank_stats in stats]
    assert final[0].replans_done >= 1 and final[0].layers_switched >= 1
    assert final[0].layers_switched == final[1].layers_switched
    assert [s.step for s in stats[1]] == list(range(8))


@pytest.mark.slow
def test_a_plan_that_needs_more_cpus_than_the_cluster_has_is_refused(local_ray, tmp_path):
    job, _, _ = job_of(tmp_path, 4)
    with pytest.raises(ClusterError, match=r"needs 4 CPU workers \(4 CPU\) but the Ray cluster has 2 CPU"):
        run_job(job, cpus_per_worker=1.0)


@pytest.mark.slow
def test_workers_that_cannot_be_placed_now_fail_without_hanging(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_cluster, "PLACE_TIMEOUT_S", 1.0)
    held = placement_group([{"CPU": 1.5}])
    ray.get(held.ready(), timeout=30)
    try:
        job, _, _ = job_of(tmp_path, 2)
        with pytest.raises(ClusterError, match=r"could not place 2 bundles of \{'CPU': 0.5\} \(PACK\) within 1 s"):
            run_job(job, cpus_per_worker=0.5)
    finally:
        remove_placement_group(held)


def ray_main_of(tmp_path: Path, *flags: str) -> int:
    """`rnq-ep run --ray` of a 2-worker tiny plan with `flags` (LOADS: its load file, PLAN: its plan); the exit code."""
    plan, loads = write_job_files(tmp_path, 2)
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    add_ray_arguments(parser)
    args = parser.parse_args(["--ray", "--plan", plan, "--loads", loads, "--tokens", "8", "--backend", "torch",
                              *(arg.replace("LOADS", loads).replace("PLAN", plan) for arg in flags)])
    return ray_main(args)


def ray_main_output(tmp_path: Path, capsys, *flags: str) -> str:
    """`rnq-ep run --ray` of a 2-worker tiny plan with `flags`: what it printed (it must exit 0)."""
    assert ray_main_of(tmp_path, *flags) == 0
    return capsys.readouterr().out


def broken_plan(tmp_path: Path) -> str:
    """The 2-worker tiny plan with a negative share in layer 0."""
    raw = msgspec.to_builtins(bf16_plan(2))
    raw["layers"][0]["slots"][1]["share"] = -0.5
    path = tmp_path / "broken.json"
    path.write_bytes(msgspec.json.encode(raw))
    return str(path)


def far_layers(tmp_path: Path) -> str:
    """Loads for decoder layers 0 and 99 of the 2-layer tiny model."""
    path = tmp_path / "far.json"
    path.write_bytes(encode_json(LoadStats(counts=[[1] * 8] * 2, num_experts=8, top_k=2, layer_ids=[0, 99])))
    return str(path)


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "-1"], "--timeout -1: expected a number of seconds > 0"),
    (["--max-restarts", "-1"], "--max-restarts -1: expected an integer >= 0"),
    (["--cpus-per-worker", "nan"], "--cpus-per-worker nan: expected a number of CPUs > 0"),
    (["--loads-after", "LOADS", "--drift-step", "-3"], "--drift-step -3: expected an integer in [0, 4]"),
    (["--steps", "0"], "--steps 0: expected an integer in [1, 1000000]"),
    (["--plan", "BROKEN"], "slots[1]: share -0.5, expected a finite number >= 0"),
    (["--loads", "FAR"], "layer_ids[1]: 99 is not a decoder layer of model 'tiny'"),
])
def test_bad_input_exits_2_with_one_line_before_ray_starts(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(ray_cli, "connect", lambda *args: pytest.fail("Ray was started before the input was checked"))
    flags = [flag.replace("BROKEN", broken_plan(tmp_path)).replace("FAR", far_layers(tmp_path)) for flag in flags]
    assert ray_main_of(tmp_path, "--steps", "5", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("rnq-ep run: error: ")


def test_ray_colour_codes_are_dropped_unless_the_stream_is_a_terminal():
    coloured = "\x1b[36mray::EPWorker.run()\x1b[39m (pid=7) died"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert shown(coloured, io.StringIO()) == "ray::EPWorker.run() (pid=7) died"
    assert shown(coloured, Terminal()) == coloured


@pytest.mark.slow
def test_after_a_second_worker_death_the_finished_steps_are_printed(local_ray, tmp_path, capsys, monkeypatch):
    killed = []

    def run_job_killing_rank_1_in_each_attempt(job, max_restarts, cpus_per_worker, on_event):
        def sink(event):
            on_event(event)
            if event.kind == "step" and event.attempt not in killed:
                killed.append(event.attempt)
                ray.kill(event.actors[1])

        return run_job(job, max_restarts, cpus_per_worker, sink)

    monkeypatch.setattr(ray_cli, "run_job", run_job_killing_rank_1_in_each_attempt)
    assert ray_main_of(tmp_path, "--steps", "8", "--max-restarts", "1") == 1
    captured = capsys.readouterr()
    assert killed == [0, 1]
    assert "step(s) every worker finished before the job stopped" in captured.out and "balancedness" in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("rnq-ep run: worker failed: worker rank 1")


@pytest.mark.slow
def test_ray_main_passes_rebalancing_flags_and_prints_the_step_and_worker_tables(local_ray, tmp_path, capsys):
    out = ray_main_output(tmp_path, capsys, "--steps", "2", "--rebalance-interval", "1", "--loads-after", "LOADS",
                          "--drift-step", "1")
    assert "on Ray: 2 workers, policy least-loaded" in out and "expert rows computed" in out and "restarts: 0" in out
    assert "re-plans done" in out  # the rebalancing flags reached the workers


@pytest.mark.slow
def test_ray_main_passes_the_spill_format_to_the_workers(local_ray, tmp_path, capsys):
    out = ray_main_output(tmp_path, capsys, "--steps", "1", "--spill", "int4")
    assert "spill int4" in out and "MB spilled" in out  # SpillMoE layers ran on the workers


@pytest.mark.slow
def test_a_load_file_for_other_layers_is_refused_before_any_worker_starts(tmp_path):
    plan, _ = write_job_files(tmp_path, 2)
    other = tmp_path / "other.json"
    other.write_bytes(encode_json(LoadStats(counts=[[1] * 8], num_experts=8, top_k=2, layer_ids=[3])))
    with pytest.raises(SpecError, match=f"--loads-after {other}: loads: has layers \\[3\\], the plan has layers"):
        make_job(plan, None, loads_after=str(other), tokens=TOKENS, steps=STEPS)


def test_an_unreachable_address_fails_fast_with_a_clear_error(tmp_path):
    plan, _ = write_job_files(tmp_path, 2)
    done = subprocess.run(
        [sys.executable, "launch/ray_job.py", "--ray", "127.0.0.1:1", "--plan", plan],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert done.returncode == 2
    assert "cannot reach a Ray cluster at 127.0.0.1:1" in done.stderr


def test_a_multi_node_plan_on_several_nodes_gets_one_bundle_per_node():
    placement = placement_for(bf16_plan(8, nodes=2, device="gpu"), {"GPU": 16.0, "CPU": 64.0}, alive_nodes=2)
    assert placement.strategy == "STRICT_SPREAD" and placement.bundles == [{"GPU": 4.0}] * 2
    assert placement.per_bundle == 4


def test_a_multi_node_plan_on_one_node_packs_one_bundle_per_worker():
    placement = placement_for(bf16_plan(8, nodes=2, device="gpu"), {"GPU": 8.0}, alive_nodes=1)
    assert placement.strategy == "PACK" and placement.bundles == [{"GPU": 1.0}] * 8


def test_a_gpu_plan_on_a_cluster_without_gpus_is_refused():
    with pytest.raises(ClusterError, match=r"needs 4 GPU workers \(4 GPU\) but the Ray cluster has 0 GPU"):
        placement_for(bf16_plan(4, device="gpu"), {"CPU": 2.0}, alive_nodes=1)


def test_cpu_workers_split_the_cpus_at_most_one_each():
    assert placement_for(bf16_plan(4), {"CPU": 2.0}, alive_nodes=1).cpus == 0.5
    assert placement_for(bf16_plan(2), {"CPU": 16.0}, alive_nodes=1).cpus == 1.0


def test_torchrun_env_numbers_ranks_per_node_and_points_at_rank_0():
    workers = [WorkerInfo(r, f"a{r}", "n0" if r < 2 else "n1", "10.0.0.1" if r < 2 else "10.0.0.2", r) for r in range(4)]
    envs = torchrun_env(workers, 1234, [["3"], ["5"], ["0"], ["1"]])
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.1"} and {e["MASTER_PORT"] for e in envs} == {"1234"}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,5", "3,5", "0,1", "0,1"]
    assert [e["WORLD_SIZE"] for e in envs] == ["4"] * 4


def _gloo_outputs(rank: int, world: int, plan: str, loads: str) -> list[torch.Tensor]:
    """One gloo rank of the same job, as torchrun runs it (thread counts differ: fp32 summation order may too)."""
    stats = run_worker(rank, world, plan, tokens=TOKENS, steps=STEPS, loads=loads, backend="torch", keep_outputs=True)
    return [s.output for s in stats]


@pytest.mark.slow
def test_ray_workers_produce_the_torchrun_gloo_outputs(local_ray, tmp_path):
    job, plan, loads = job_of(tmp_path, 2)
    on_ray = run_job(job).stats
    on_gloo = run_ranks(_gloo_outputs, 2, plan, loads)
    for rank in range(2):
        for step in range(STEPS):
            torch.testing.assert_close(on_ray[rank][step].output, on_gloo[rank][step], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bad_input_on_a_worker_is_reported_and_not_retried(local_ray, tmp_path):
    plan, loads = write_job_files(tmp_path, 2)
    other = msgspec.structs.replace(MODEL, name="other", num_experts=16)
    job = make_job(plan, loads, tokens=TOKENS, steps=STEPS, backend="torch", timeout_s=60)
    events = []
    with pytest.raises(SpecError, match=r"rank 0: model 'other' has 16 experts"):
        run_job(dataclasses.replace(job, options=msgspec.structs.replace(job.options, model=other)), max_restarts=1, on_event=lambda event: events.append(event.kind))
    assert "restarting" not in events


@pytest.mark.slow
def test_an_hf_model_generates_the_original_greedy_tokens_on_ray_workers(local_ray, tmp_path):
    pytest.importorskip("transformers")
    from rnq_ep import hf
    from rnq_ep.planner import plan_plain_ep

    model = hf.tiny_model("mixtral")
    spec = hf.model_spec(model, "tiny-mixtral")
    layers = [layer_id for layer_id, _, _ in hf.moe_layers(model)]
    stats = LoadStats(counts=[[1] * spec.num_experts] * len(layers), num_experts=spec.num_experts, top_k=spec.top_k, layer_ids=layers)
    plan_path = tmp_path / "plan.json"
    plan_path.write_bytes(encode_json(plan_plain_ep(spec, bf16_plan(2).cluster, stats)))
    job = make_job(str(plan_path), hf="tiny-mixtral", tokens=12, steps=3, timeout_s=120)
    reports = run_job(job).stats
    for report in reports:
        prompt = report.tokens[:, :12]
        with torch.no_grad():
            expected = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert torch.equal(report.tokens, expected)
