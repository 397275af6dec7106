"""scripts/benchmarks.py: where R&Q loses is read from the simulate fragment of the same run."""

import importlib.util
import sys
from pathlib import Path

from rnq_ep.bench.planner import to_markdown
from rnq_ep.policies import PolicyRun
from rnq_ep.simulate import scale_table
from rnq_ep.specs import load_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmarks.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(gpus: int, policy: str, layer_s: float) -> PolicyRun:
    return PolicyRun(policy, gpus, layer_s=layer_s, flop_s=0, hbm_s=0, comm_s=0, move_s=0)


def test_rnq_losses_lists_gpu_counts_where_the_best_rnq_variant_is_slower():
    runs = {
        8: [run(8, "plain EP", 4e-3), run(8, "LLEP spill", 1e-3), run(8, "R&Q bf16+int8", 2e-3), run(8, "R&Q bf16+int8+int4", 3e-3)],
        32: [run(32, "plain EP", 4e-3), run(32, "LLEP spill", 3e-3), run(32, "R&Q bf16+int8", 2e-3)],
    }
    text = to_markdown([scale_table(runs, load_model("tiny"), "rnq-ep simulate: t")], "rnq-ep simulate", "cpu", "today")
    assert load_script().rnq_losses(text) == ["8 GPUs: R&Q bf16+int8 2.00x the time of LLEP spill"]


def test_summary_rows_give_the_fastest_policy_and_rnq_speedups_over_the_same_runs_baselines():
    names = ("plain EP", "EPLB +12.5 % mem, hash", "EPLB +12.5 % mem, least-loaded", "LLEP spill", "R&Q bf16+int8",
             "R&Q + int4 spill")
    runs = {8: [run(8, name, t) for name, t in zip(names, (4e-3, 3e-3, 2.5e-3, 1e-3, 2e-3, 1.25e-3))]}
    text = to_markdown([scale_table(runs, load_model("tiny"), "rnq-ep simulate: t")], "rnq-ep simulate", "cpu", "today")
    assert load_script().summary_rows("m", text) == [
        "| m | 8 | LLEP spill | R&Q bf16+int8 | 2.00x | 1.50x | 1.25x | 0.50x | — | — | 0.80x |"
    ]


def test_summary_compares_static_rnq_with_static_baselines_and_replanned_rnq_with_replanned_eplb():
    names = ("plain EP", "EPLB +12.5 % mem, hash", "EPLB +12.5 % mem, least-loaded", "LLEP spill", "R&Q bf16+int8+int4",
             "EPLB +12.5 % mem, least-loaded + re-plan", "R&Q bf16+int8+int4 + re-plan", "R&Q + int4 spill")
    times = (4e-3, 3e-3, 3e-3, 1e-3, 2.5e-3, 2.5e-3, 2e-3, 1e-3)
    runs = {8: [run(8, name, t) for name, t in zip(names, times)]}
    text = to_markdown([scale_table(runs, load_model("tiny"), "rnq-ep simulate: t")], "rnq-ep simulate", "cpu", "today")
    row = load_script().summary_rows("m", text)[0]
    assert "| R&Q bf16+int8+int4 | 1.60x | 1.20x | 1.20x | 0.40x | 2.00x | 1.25x | 1.00x |" in row, "static vs static"
    assert load_script().rnq_losses(text) == ["8 GPUs: R&Q bf16+int8+int4 + re-plan 2.00x the time of LLEP spill"]


def test_summary_says_when_the_fastest_policy_is_tied():
    names = ("plain EP", "EPLB +12.5 % mem, hash", "EPLB +12.5 % mem, least-loaded", "LLEP spill", "R&Q bf16+int8")
    runs = {8: [run(8, name, t) for name, t in zip(names, (4e-3, 2e-3, 2e-3, 3e-3, 2e-3))]}
    text = to_markdown([scale_table(runs, load_model("tiny"), "rnq-ep simulate: t")], "rnq-ep simulate", "cpu", "today")
    assert "| EPLB +12.5 % mem, hash (tied with 2 more) |" in load_script().summary_rows("m", text)[0]


def test_each_program_start_prints_which_of_how_many_and_the_time_so_far(capsys):
    script = load_script()
    log = script.RunLog(total=script.program_count({"simulate", "e2e", "step"}, cuda=False))
    assert log.total == 1 + 2 + 1, "planner, two layer benches, rebalance"
    assert script.program_count({"simulate", "e2e"}, cuda=False) == 5, "and bench step"
    assert script.run([sys.executable, "-c", "pass"], log)
    assert script.run([sys.executable, "-c", "raise SystemExit(3)"], log) is False
    progress = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in progress] == ["[1/4", "[2/4"]
    assert progress[0].endswith("] python -c pass") and " s] " in progress[0]
    assert log.lines[1].endswith("exit 3")
