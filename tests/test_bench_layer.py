"""`rnq-ep bench layer`: its configurations, its summary of per-rank stats, and one tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rnq_ep.bench.layer import (
    EPLB_EXTRA, PLAIN, RNQ_HASH, RNQ_INT4, RNQ_INT4_HASH, RNQ_LEAST_LOADED, configs, main, summarise,
)
from rnq_ep.bench.skew import single_layer, skewed_layers
from rnq_ep.layer import LayerStats
from rnq_ep.memory import plain_ep_budget
from rnq_ep.metrics import gpu_bytes, layer_tables
from rnq_ep.runtime.worker import StepStats
from rnq_ep.specs import CONFIG_DIR, load_model, load_stats

TINY = load_model("tiny")  # 8 experts, top-2, like the Mixtral load file
MIXTRAL_LOADS = CONFIG_DIR / "loads" / "mixtral-8x7b-v0.1_olmoe-repo_github.json"
LOADS = load_stats(MIXTRAL_LOADS)


def _step(step: int, seconds: float, cpu_per_layer: list[float]) -> StepStats:
    layers = [LayerStats(np.array([3, 1]), np.array([3]), 1.5, 100, 200, cpu, 100) for cpu in cpu_per_layer]
    return StepStats(step, seconds, layers)


def test_configurations_compare_plain_ep_eplb_and_both_rnq_routings():
    runs = configs(TINY, "cpu4", 4, LOADS)
    assert [(r.name, r.policy) for r in runs] == [
        (PLAIN, "least-loaded"), (EPLB_EXTRA, "static"), (RNQ_LEAST_LOADED, "least-loaded"), (RNQ_HASH, "hash"),
        (RNQ_INT4, "least-loaded"), (RNQ_INT4_HASH, "hash"),
    ]
    assert runs[2].plan is runs[3].plan and runs[4].plan is runs[5].plan
    assert {s.fmt for layer in runs[2].plan.layers for s in layer.slots} <= {"bf16", "int8"}


def test_rnq_stays_within_plain_ep_memory_and_eplb_gets_one_eighth_more():
    runs = {r.name: r.plan for r in configs(TINY, "cpu4", 4, LOADS)}
    budget = plain_ep_budget(TINY, 4)
    most = {name: max(gpu_bytes(TINY, t).max() for t in layer_tables(plan)) for name, plan in runs.items()}
    assert most[RNQ_LEAST_LOADED] <= budget and most[RNQ_INT4] <= budget
    assert most[EPLB_EXTRA] <= 1.125 * budget


def test_summary_without_turns_skips_the_warm_up_step_and_takes_the_slowest_rank_per_layer():
    rank0 = [_step(0, 9.0, [9.0, 9.0]), _step(1, 2.0, [0.5, 0.1]), _step(2, 4.0, [0.4, 0.3])]
    rank1 = [_step(0, 9.0, [9.0, 9.0]), _step(1, 2.0, [0.2, 0.6]), _step(2, 4.0, [0.3, 0.7])]
    measured = summarise([rank0, rank1])
    assert measured.wall_s == 3.0
    assert measured.critical_s == pytest.approx(max(0.4, 0.2) + max(0.1, 0.6))
    assert measured.mb_sent == pytest.approx(2 * 2 * 100 / 1e6)  # ranks x layers x bytes
    assert measured.mb_sent_no_dedupe == pytest.approx(2 * 2 * 200 / 1e6)


def test_critical_step_with_ranks_in_turns_is_the_median_step_of_the_slowest_rank_per_layer():
    steps = [_step(s, 1.0, [0.0, 0.0]) for s in range(4)]
    alone = np.array([  # [rank, step, layer]; step 0 is the warm-up
        [[9.0, 9.0], [0.5, 0.1], [0.4, 0.3], [0.1, 0.1]],
        [[9.0, 9.0], [0.2, 0.6], [0.3, 0.7], [0.2, 0.2]],
    ])
    measured = summarise([steps, steps], alone)
    assert measured.critical_s == pytest.approx(np.median([0.5 + 0.6, 0.4 + 0.7, 0.2 + 0.2]))


@pytest.mark.slow
def test_tiny_bench_prints_a_row_per_configuration(capsys):
    argv = ["--model", "tiny", "--loads", str(MIXTRAL_LOADS), "--hidden", "32", "--inter", "64",
            "--tokens", "16", "--steps", "1", "--ranks", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    names = (PLAIN, EPLB_EXTRA, RNQ_LEAST_LOADED, RNQ_HASH, RNQ_INT4, RNQ_INT4_HASH)
    assert all(f"| {name} |" in out for name in names)


def _write_loads(path, counts):
    path.write_text(json.dumps({"counts": counts, "num_experts": 8, "top_k": 2, "layer_ids": [3, 9]}))


def test_skewed_layers_rank_every_layer_by_plain_ep_max_over_mean(tmp_path):
    _write_loads(tmp_path / "mixtral-8x7b_even.json", [[10] * 8, [10] * 8])
    _write_loads(tmp_path / "mixtral-8x7b_skewed.json", [[10] * 8, [50, 30] + [10] * 6])
    _write_loads(tmp_path / "unknown-model_x.json", [[100] + [1] * 7, [10] * 8])  # no config: skipped
    layers = skewed_layers(4, folders=(tmp_path,))
    assert len(layers) == 4
    top = layers[0]
    assert (top.path.name, top.position, top.layer_id, top.model) == ("mixtral-8x7b_skewed.json", 1, 9, "mixtral-8x7b")
    assert top.plain_ep_balancedness == pytest.approx(80 / (140 / 4))


def test_single_layer_keeps_one_row_and_its_decoder_layer_id():
    one = single_layer(LOADS, 1)
    assert one.counts == [LOADS.counts[1]] and one.layers == [LOADS.layers[1]]


def test_most_skewed_refuses_an_explicit_load_file():
    with pytest.raises(SystemExit, match="--most-skewed chooses the load file"):
        main(["--most-skewed", "--loads", str(MIXTRAL_LOADS)])
