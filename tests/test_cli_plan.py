"""`rnq-ep plan` and `rnq-ep bench planner` driven in process on the shipped load files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rnq_ep.cli import main
from rnq_ep.planner import plan_arrays
from rnq_ep.specs import load_plan

LOADS = Path(__file__).resolve().parent.parent / "configs" / "loads"
ARXIV = str(LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json")
GITHUB = str(LOADS / "olmoe-1b-7b-0924_olmoe-repo_github.json")
POLICIES = ("plain EP", "EPLB-equivalent, same memory", "EPLB-equivalent, +12.5 %", "R&Q")


def plan_args(out, *extra):
    return ["plan", "--model", "olmoe-1b-7b", "--cluster", "h100x8", "--loads", ARXIV, "--out", str(out), *extra]


def test_plan_prints_every_policy_and_writes_a_loadable_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(plan_args(out)) == 0
    printed = capsys.readouterr().out
    for policy in POLICIES:
        assert policy in printed
    assert "scored on the same loads" in printed
    plan = load_plan(out)
    assert [layer.layer for layer in plan.layers] == [0, 7, 15]
    assert plan.summary["policies"]["rnq"]["balancedness_best"]["median"] >= 1.0
    assert plan.summary["speedup_vs_plain_ep"] > 0


def test_plan_slots_are_ordered_by_gpu(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(plan_args(out)) == 0
    for layer in json.loads(out.read_text())["layers"]:
        gpus = [slot["gpu"] for slot in layer["slots"]]
        assert gpus == sorted(gpus)


def test_hedges_are_on_by_default_and_no_hedge_turns_them_off(tmp_path, capsys):
    default, hedged, plain = tmp_path / "default.json", tmp_path / "hedged.json", tmp_path / "plain.json"
    for path, flags in ((default, ()), (hedged, ("--hedge",)), (plain, ("--no-hedge",))):
        assert main(plan_args(path, *flags)) == 0
    slots = lambda path: sum(len(layer.slots) for layer in load_plan(path).layers)  # noqa: E731
    assert load_plan(default).options.hedge and load_plan(hedged).options.hedge and not load_plan(plain).options.hedge
    assert slots(default) == slots(hedged) > slots(plain)


def test_eval_loads_are_named_in_the_table_title(tmp_path, capsys):
    assert main(plan_args(tmp_path / "plan.json", "--eval-loads", GITHUB)) == 0
    printed = capsys.readouterr().out
    assert "scored on OTHER loads olmoe-1b-7b-0924_olmoe-repo_github.json" in printed


def test_bf16_plan_exports_sglang_physical_to_logical_map(tmp_path, capsys):
    out, export = tmp_path / "plan.json", tmp_path / "sglang.json"
    assert main(plan_args(out, "--formats", "bf16", "--export", f"sglang:{export}")) == 0
    phy2log, _, _ = plan_arrays(load_plan(out))
    assert json.loads(export.read_text())["physical_to_logical_map"] == phy2log.tolist()


def test_plot_writes_a_png(tmp_path, capsys):
    png = tmp_path / "loads.png"
    assert main(plan_args(tmp_path / "plan.json", "--plot", str(png))) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--memory-budget", "1000"], "bytes"),
        (["--formats", "bf16,fp8"], "--formats: unknown format"),
        (["--memory-budget", "lots"], "--memory-budget: expected bytes"),
        (["--export", "trt:x.json"], "--export: expected sglang:PATH or vllm:PATH"),
        (["--quality-budget", "1.5"], "quality_budget must be in [0, 1]"),
        (["--plot", "no/such/folder/x.png"], "--plot no/such/folder/x.png: folder"),
        (["--eval-loads", str(LOADS / "mixtral-8x7b-v0.1_olmoe-repo_github.json")], "num_experts=8"),
        (["--tokens-per-gpu", str(10**23)], "--tokens-per-gpu 100000000000000000000000: expected an integer in [1, 2**24]"),
        (["--memory-budget", "1e30"], "bytes per GPU is more than every expert of 'olmoe-1b-7b' in bf16"),
    ],
)
def test_bad_or_infeasible_request_exits_2_with_one_line_and_no_file(tmp_path, capsys, extra, message):
    out = tmp_path / "plan.json"
    assert main(plan_args(out, *extra)) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_name_exits_2(tmp_path, capsys):
    args = plan_args(tmp_path / "plan.json")
    args[args.index("olmoe-1b-7b")] = "olmoe-2"
    assert main(args) == 2
    assert "unknown model 'olmoe-2'" in capsys.readouterr().err


def test_missing_flag_exits_2(capsys):
    assert main(["plan", "--model", "tiny"]) == 2
    assert "required" in capsys.readouterr().err


def test_help_explains_every_flag_with_defaults(capsys):
    assert main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--cluster", "--loads", "--out", "--eval-loads", "--formats", "--quality-budget",
                 "--memory-budget", "--max-copies", "--refine", "--refine-time-limit", "--hedge", "--export", "--plot"):
        assert flag in text
    assert "default: bf16,int8" in text


def test_python_dash_m_runs_the_same_cli():
    done = subprocess.run([sys.executable, "-m", "rnq_ep", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "plan" in done.stdout


def loads_like_arxiv(tmp_path, counts) -> str:
    """The arXiv load file's shape (3 layers x 64 experts, top-8) with every count set to `counts`."""
    raw = json.loads(Path(ARXIV).read_text())
    body = {"counts": [[counts] * 64] * 3, "num_experts": 64, "top_k": 8, "layer_ids": raw["layer_ids"]}
    path = tmp_path / "in" / "loads.json"
    path.parent.mkdir()
    path.write_text(json.dumps(body))
    return str(path)


@pytest.mark.parametrize("count, message", [(0, "counts[0]: every count is 0"),
                                            (10**30, "counts[0][0]: 1000000000000000000000000000000 is not a token count")])
def test_a_load_file_with_no_tokens_or_too_many_exits_2_naming_the_count(tmp_path, capsys, count, message):
    loads = loads_like_arxiv(tmp_path, count)
    args = ["plan", "--model", "olmoe-1b-7b", "--cluster", "h100x8", "--loads", loads, "--out", str(tmp_path / "p.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{loads}: {message}" in err and err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()
