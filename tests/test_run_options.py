"""`rnq-ep run` under torchrun: RunOptions built and every file checked before the process group, one line once."""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec
import pytest
import torch

from rnq_ep.cli import main
from rnq_ep.layout import CAPACITY_MAX_TOKENS
from rnq_ep.runtime.options import RunOptions
from rnq_ep.runtime.worker import build_layers, run_worker
from rnq_ep.specs import LoadStats, SpecError, encode_json, load_plan
from test_torchrun import skewed_loads, write_plan


def broken(tmp_path: Path, edit) -> str:
    """write_plan's 2-GPU plan with edit(slots of layer 0) applied."""
    raw = msgspec.json.decode(Path(write_plan(tmp_path / "good.json", 2)).read_bytes())
    edit(raw["layers"][0]["slots"])
    path = tmp_path / "broken.json"
    path.write_bytes(msgspec.json.encode(raw))
    return str(path)


def set_slot(index: int, key: str, value):
    return lambda slots: slots[index].update({key: value})


BAD = {
    "tokens 0": (["--tokens", "0"], "--tokens 0: expected an integer in [1, 1048576]"),
    "steps 0": (["--steps", "0"], "--steps 0: expected an integer in [1, 1000000]"),
    "timeout 0": (["--timeout", "0"], "--timeout 0: expected a number of seconds > 0"),
    "timeout nan": (["--timeout", "nan"], "--timeout nan: expected a number of seconds > 0"),
    "drift step -3": (["--loads-after", "LOADS", "--drift-step", "-3"], "--drift-step -3: expected an integer in [0, 4]"),
    "drift step alone": (["--drift-step", "3"], "--drift-step 3: needs --loads-after"),
    "seed -1": (["--seed", "-1"], "--seed -1: expected an integer in [0, "),
    "copies per step 0": (["--rebalance-copies-per-step", "0"], "--rebalance-copies-per-step 0: expected an integer"),
    "negative share": (["--plan", "NEGATIVE_SHARE"], "slots[1]: share -0.5, expected a finite number >= 0"),
    "gpu out of range": (["--plan", "GPU_OUT_OF_RANGE"], "gpu 7 out of range, the cluster has 2 GPUs"),
    "unknown expert": (["--plan", "UNKNOWN_EXPERT"], "unknown expert 12, the model has 8"),
    "shares not summing to 1": (["--plan", "HALF_SHARE"], "copies sum to 0.5, expected 1"),
    "load layers beyond the model": (["--loads", "FAR_LAYERS"], "layer_ids[1]: 99 is not a decoder layer of model 'tiny'"),
    "missing load file": (["--loads", "no-such.json"], "--loads no-such.json: no such file"),
}


def run_argv(tmp_path: Path, flags: list[str]) -> list[str]:
    """`rnq-ep run` of the 2-GPU tiny plan (5 steps) with `flags`, placeholders replaced by files in tmp_path."""
    loads = skewed_loads(tmp_path / "loads.json")
    far = tmp_path / "far.json"
    far.write_bytes(encode_json(LoadStats(counts=[[1] * 8] * 2, num_experts=8, top_k=2, layer_ids=[0, 99])))
    files = {
        "LOADS": lambda: loads, "FAR_LAYERS": lambda: str(far),
        "NEGATIVE_SHARE": lambda: broken(tmp_path, set_slot(1, "share", -0.5)),
        "GPU_OUT_OF_RANGE": lambda: broken(tmp_path, set_slot(-1, "gpu", 7)),
        "UNKNOWN_EXPERT": lambda: broken(tmp_path, set_slot(1, "expert", 12)),
        "HALF_SHARE": lambda: broken(tmp_path, set_slot(1, "share", 0.5)),
    }
    flags = [files[flag]() if flag in files else flag for flag in flags]
    return ["run", "--plan", write_plan(tmp_path / "plan.json", 2), "--steps", "5", *flags]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line_and_exit_2_before_the_process_group(case, tmp_path, caplog, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined the group before checking"))
    flags, message = BAD[case]
    assert main(run_argv(tmp_path, flags)) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0], errors


def test_ranks_other_than_local_rank_0_exit_2_without_repeating_the_line(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(run_argv(tmp_path, ["--tokens", "0"])) == 2
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_check_accepts_good_input_without_running_a_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")  # --check reads no world size: the 2-GPU plan is checked as planned
    assert main(run_argv(tmp_path, ["--loads", "LOADS", "--check"])) == 0
    assert "balancedness" not in capsys.readouterr().out


@pytest.mark.parametrize("transport", ["auto", "exact", "capacity"])
def test_each_transport_is_accepted(transport):
    assert RunOptions(plan="p.json", transport=transport).transport == transport


def test_an_unknown_transport_is_refused_naming_the_choices():
    with pytest.raises(SpecError, match="--transport 'fast': expected one of auto, exact, capacity"):
        RunOptions(plan="p.json", transport="fast")


def test_the_transport_flag_says_what_auto_picks(capsys):
    assert main(["run", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "{auto,exact,capacity}" in help_text
    assert f"auto: capacity at small token counts (up to {CAPACITY_MAX_TOKENS} per rank) in compiled" in help_text


def test_the_transport_reaches_every_layer(tmp_path):
    plan = load_plan(write_plan(tmp_path / "plan.json", 1))
    for transport in ("exact", "capacity"):
        layers = build_layers(plan, plan.model, 0, None, seed=0, backend="torch", transport=transport)
        assert [layer.transport for layer in layers] == [transport] * len(plan.layers)


def test_both_transports_give_the_same_outputs(tmp_path):
    plan, loads = write_plan(tmp_path / "plan.json", 1), skewed_loads(tmp_path / "loads.json")
    outputs = {transport: [s.output for s in run_worker(0, 1, plan, loads=loads, tokens=8, steps=2, backend="torch",
                                                        keep_outputs=True, transport=transport)]
               for transport in ("exact", "capacity")}
    for exact, capacity in zip(outputs["exact"], outputs["capacity"]):
        torch.testing.assert_close(capacity, exact, rtol=1e-5, atol=1e-5)
