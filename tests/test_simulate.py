"""simulate: ratios against the same run's baseline, tables, and the CLI end to end on tiny sizes."""

from pathlib import Path

import pytest

from rnq_ep.policies import POLICIES, PolicyRun
from rnq_ep.load_windows import drawn_windows
from rnq_ep.replan_sim import REPLAN_POLICIES
from rnq_ep.simulate import main, ratios, replan_cell, scale_table, sweep_table
from rnq_ep.specs import LoadStats, encode_json, load_model

SHIPPED = Path(__file__).resolve().parent.parent / "configs" / "loads"
TINY = ["--model", "tiny", "--layers", "2", "--sweep-layers", "2", "--tokens-per-gpu", "2048"]
OLMOE_SHIFT = ["--model", "olmoe-1b-7b", "--gpus", "8", "--loads", str(SHIPPED / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"),
               "--eval-loads", str(SHIPPED / "olmoe-1b-7b-0924_olmoe-repo_github.json"), "--tokens-per-gpu", "512",
               "--sweep", "none"]


def run(policy: str, layer_s: float, error: str = "") -> PolicyRun:
    return PolicyRun(policy, 8, layer_s=layer_s, flop_s=0, hbm_s=0, comm_s=0, move_s=0, error=error)


def test_ratios_are_against_plain_ep_and_the_best_other_policy_of_the_same_run():
    runs = [run("plain EP", 4.0), run("A", 2.0), run("B", 1.0), run("C", float("nan"), error="infeasible")]
    got = ratios(runs)
    assert got[:3] == [(1.0, 4.0), (0.5, 2.0), (0.25, 0.5)]


def test_scale_table_marks_the_fastest_policy_and_explains_an_infeasible_one():
    runs = [run("plain EP", 4.0), run("B", 1.0), run("C", float("nan"), error="needs 3 bytes")]
    rows = scale_table({8: runs}, load_model("tiny"), "t").rows
    assert rows[1][4] == "0.25 (best)" and rows[2][2] == "infeasible: needs 3 bytes"


def test_sweep_table_names_the_fastest_policy_per_exponent():
    sweep = {0.5: (2.0, [run("plain EP", 1.0), run("LLEP", 2.0)]), 1.5: (9.0, [run("plain EP", 4.0), run("LLEP", 1.0)])}
    table = sweep_table(sweep, 32, "sweep")
    assert [row[-1] for row in table.rows] == ["plain EP", "LLEP"]
    assert table.note == "plain EP fastest at s = 0.5; LLEP fastest at s = 1.5"


def test_cli_prints_the_tables_and_writes_markdown_and_plot(tmp_path, capsys):
    md, png = tmp_path / "sim.md", tmp_path / "sim.png"
    code = main([*TINY, "--gpus", "4,16", "--sweep", "0.5,1.5", "--sweep-gpus", "4", "--markdown", str(md), "--plot", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and "rnq-ep simulate: tiny" in out and "Skew sweep" in out
    text = md.read_text()
    assert text.startswith("Command: `rnq-ep simulate --model tiny")
    assert sum(line.startswith("| 16 | ") for line in text.splitlines()) == len(POLICIES) and "R&Q bf16+int8+int4" in text and "![tiny simulation](sim.png)" in text
    assert png.stat().st_size > 0


def test_cli_labels_one_load_file_as_in_sample(tmp_path, capsys):
    loads = SHIPPED / "mixtral-8x7b-v0.1_olmoe-repo_github.json"
    code = main(["--model", "mixtral-8x7b", "--gpus", "8", "--loads", str(loads), "--sweep", "none"])
    assert code == 0 and "in sample" in capsys.readouterr().out


def test_cli_scores_sampled_windows_of_one_load_file_as_stationary_traffic(tmp_path, capsys):
    loads = SHIPPED / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"
    md = tmp_path / "sim.md"
    code = main(["--model", "olmoe-1b-7b", "--gpus", "8", "--loads", str(loads), "--eval-loads", "sampled",
                 "--windows", "3", "--tokens-per-gpu", "512", "--sweep", "none", "--markdown", str(md)])
    assert code == 0 and "3 windows of GPUs x 512 tokens drawn from" in capsys.readouterr().out
    assert sum(line.startswith("| 8 | ") for line in md.read_text().splitlines()) == len(POLICIES)


def test_cli_scores_windows_drawn_after_a_shift_with_the_replan_policies_beside_the_static_ones(tmp_path, capsys):
    md = tmp_path / "sim.md"
    code = main([*OLMOE_SHIFT, "--windows", "3", "--replan-interval", "5", "--markdown", str(md)])
    assert code == 0 and "scored on 3 windows of GPUs x 512 tokens drawn from" in capsys.readouterr().out
    lines = md.read_text().splitlines()
    assert sum(line.startswith("| 8 | ") for line in lines) == len(POLICIES) + len(REPLAN_POLICIES)
    assert "re-plan every 5 steps" in md.read_text() and "re-plan moves: layers / MB / ms |" in md.read_text()
    assert all(any(line.startswith(f"| 8 | {p.name} |") for line in lines) for p in REPLAN_POLICIES)


def test_cli_keeps_one_pair_of_whole_files_without_windows(capsys):
    code = main(OLMOE_SHIFT)
    out = capsys.readouterr().out
    assert code == 0 and "re-plan" not in out and "scored on olmoe-1b-7b-0924_olmoe-repo_github.json" in out


def test_replan_cell_shows_moves_per_replan_and_a_dash_for_static_policies():
    moved = PolicyRun("R&Q + re-plan", 8, replans=3, replan_layers=1.5, replan_bytes=3 * 2**20, replan_s=2e-3)
    assert (replan_cell(moved), replan_cell(run("plain EP", 1.0))) == ("1.5 / 3 / 2.00", "—")


MIXTRAL_IN_SAMPLE = ["--model", "mixtral-8x7b", "--gpus", "8", "--loads", str(SHIPPED / "mixtral-8x7b-v0.1_olmoe-repo_github.json"),
                     "--sweep", "none"]


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*OLMOE_SHIFT, "--replan-interval", "10"], "--replan-interval 10: only the re-plan policies of --eval-loads FILE --windows W"),
        ([*OLMOE_SHIFT, "--windows", "2", "--replan-interval", "0"], "--replan-interval: must be >= 1, got 0"),
        ([*MIXTRAL_IN_SAMPLE, "--windows", "4"], "--windows 4: needs zipf loads or --eval-loads"),
        ([*OLMOE_SHIFT, "--windows", "1"], "--windows: must be >= 2, got 1"),
        ([*TINY, "--eval-loads", "sampled", "--sweep", "none"], "needs --loads FILE"),
        ([*TINY, "--loads", "zipf:steep", "--sweep", "none"], "zipf:steep"),
        ([*TINY, "--gpus", "100000000", "--sweep", "none"], "--gpus: every value must be in [1, 8192], got '100000000'"),
        ([*TINY, "--sweep-gpus", "100000000"], "--sweep-gpus: must be <= 8192, got 100000000"),
        ([*TINY, "--seed", "-1", "--sweep", "none"], "--seed: must be >= 0, got -1"),
        ([*TINY, "--sweep", "0.5,nan"], "--sweep: expected finite Zipf exponents >= 0, got '0.5,nan'"),
        ([*TINY, "--tokens-per-gpu", str(10**23), "--sweep", "none"], "--tokens-per-gpu: must be <= 16777216"),
    ],
    ids=["replan-interval-without-windowed-shift", "replan-interval-below-one", "windows-in-sample",
         "one-window-after-shift", "eval-loads-with-generator", "malformed-generator", "absurd-gpu-count",
         "absurd-sweep-gpu-count", "negative-seed", "nan-exponent", "absurd-tokens-per-gpu"],
)
def test_cli_refuses_bad_flags_with_exit_code_2_and_names_them(capsys, argv, message):
    code = main(argv)
    assert code == 2 and message in capsys.readouterr().err


def test_cli_refuses_a_load_file_with_a_layer_of_no_tokens_naming_it(tmp_path, capsys):
    path = tmp_path / "zero.json"
    path.write_bytes(encode_json(LoadStats(counts=[[3] * 8, [0] * 8], num_experts=8, top_k=2)))
    code = main([*TINY, "--loads", str(path), "--sweep", "none"])
    err = capsys.readouterr().err
    assert code == 2 and f"--loads {path}: counts[1]: every count is 0" in err and err.count("\n") == 1


def test_cli_refuses_a_missing_output_folder_before_any_work(tmp_path, capsys):
    code = main([*TINY, "--markdown", str(tmp_path / "no" / "sim.md")])
    assert code == 2 and "--markdown" in capsys.readouterr().err


def test_sampled_windows_keep_the_recorded_layer_ids_and_calibrated_costs():
    recorded = LoadStats(counts=[[5, 1], [1, 5]], num_experts=2, top_k=1, layer_ids=[3, 7],
                         sensitivity=[[{"int8": 0.1}, {"int8": 0.2}]] * 2, importance=[[1.0, 2.0]] * 2)
    for plan_on, score_on in drawn_windows(recorded, windows=3, tokens=100, seed=0):
        for stats in (plan_on, score_on):
            assert (stats.layer_ids, stats.sensitivity, stats.importance) == (recorded.layer_ids, recorded.sensitivity, recorded.importance)
