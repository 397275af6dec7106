"""`rnq-ep bench layer`: its configurations, its summary of per-rank stats, and one tiny end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest

from rnq_ep.bench.layer import EPLB_EXTRA, PLAIN, configs, main, summarise
from rnq_ep.layer import LayerStats
from rnq_ep.memory import plain_ep_budget
from rnq_ep.metrics import gpu_bytes, layer_tables
from rnq_ep.runtime.worker import StepStats
from rnq_ep.specs import CONFIG_DIR, load_model

TINY = load_model("tiny")  # 8 experts, top-2, like the Mixtral load file
MIXTRAL_LOADS = CONFIG_DIR / "loads" / "mixtral-8x7b-v0.1_olmoe-repo_github.json"


def _step(step: int, seconds: float, cpu_per_layer: list[float]) -> StepStats:
    layers = [LayerStats(np.array([3, 1]), np.array([3]), 1.5, 100, 200, cpu) for cpu in cpu_per_layer]
    return StepStats(step, seconds, layers)


def test_configurations_compare_plain_ep_eplb_and_both_rnq_routings():
    runs = configs(TINY, "cpu4", 4, MIXTRAL_LOADS)
    assert [(r.name, r.policy) for r in runs] == [
        (PLAIN, "least-loaded"), (EPLB_EXTRA, "static"),
        ("R&Q, least-loaded routing", "least-loaded"), ("R&Q, hash routing", "hash"),
    ]
    assert runs[2].plan is runs[3].plan


def test_rnq_stays_within_plain_ep_memory_and_eplb_gets_one_eighth_more():
    runs = {r.name: r.plan for r in configs(TINY, "cpu4", 4, MIXTRAL_LOADS)}
    budget = plain_ep_budget(TINY, 4)
    most = {name: max(gpu_bytes(TINY, t).max() for t in layer_tables(plan)) for name, plan in runs.items()}
    assert most["R&Q, least-loaded routing"] <= budget
    assert most[EPLB_EXTRA] <= 1.125 * budget


def test_summary_skips_the_warm_up_step_and_takes_the_slowest_rank_per_layer():
    rank0 = [_step(0, 9.0, [9.0, 9.0]), _step(1, 2.0, [0.5, 0.1]), _step(2, 4.0, [0.4, 0.3])]
    rank1 = [_step(0, 9.0, [9.0, 9.0]), _step(1, 2.0, [0.2, 0.6]), _step(2, 4.0, [0.3, 0.7])]
    measured = summarise([rank0, rank1])
    assert measured.wall_s == 3.0
    assert measured.critical_s == pytest.approx(max(0.4, 0.2) + max(0.1, 0.6))
    assert measured.mb_sent == pytest.approx(2 * 2 * 100 / 1e6)  # ranks x layers x bytes
    assert measured.mb_sent_no_dedupe == pytest.approx(2 * 2 * 200 / 1e6)


@pytest.mark.slow
def test_tiny_bench_prints_a_row_per_configuration(capsys):
    argv = ["--model", "tiny", "--loads", str(MIXTRAL_LOADS), "--hidden", "32", "--inter", "64",
            "--tokens", "16", "--steps", "1", "--ranks", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in (PLAIN, EPLB_EXTRA, "R&Q, least-loaded routing", "R&Q, hash routing"))
