"""Calibration on tiny random-weight models of every family: stats, oracles, CLI, bad input."""

from __future__ import annotations

import argparse
import copy
import gc
import re
import subprocess
import sys
import warnings

import pytest
import torch

from tiny_hf import one_torch_thread  # noqa: F401  (autouse fixture; skips without transformers)
from rnq_ep import cli, hf
from rnq_ep import textdata
from rnq_ep.calibrate_command import BUILTIN, add_calibrate_arguments, calibrate_main
from rnq_ep.calibration import balanced_picks, calibrate
from rnq_ep.quant import dequantize, quantize
from rnq_ep.specs import SpecError, load_plan, load_stats
from rnq_ep.textdata import builtin_text, token_batches, tokenize

FAMILIES = sorted(hf.FAMILIES)


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    """Two [2, 32] batches of builtin text, byte-level ids."""
    return token_batches(tokenize(builtin_text()[:4000], vocab_size=512), batch=2, seq_len=32, max_tokens=128)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    return calibrate_main(parser.parse_args(list(argv)))


def capture_routed(model: torch.nn.Module, batch: torch.Tensor, layer: int) -> tuple[torch.Tensor, ...]:
    """(x [T, H], ids [T, k], weights [T, k]) that MoE layer `layer`'s experts module receives."""
    seen = []
    experts = hf.moe_layers(model)[layer][2]
    handle = experts.register_forward_hook(lambda module, args, out: seen.append(args))
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_calibrates_to_load_stats_that_rnq_ep_plan_reads(family, batches, tmp_path):
    model = hf.tiny_model(family)
    stats = calibrate(model, batches, model_name=f"tiny-{family}")
    tokens = sum(b.numel() for b in batches)
    assert all(sum(row) == tokens * stats.top_k for row in stats.counts)
    assert all(set(by_fmt) == {"int8", "int4"} for row in stats.sensitivity for by_fmt in row)
    int8 = [by_fmt["int8"] for row in stats.sensitivity for by_fmt in row]
    int4 = [by_fmt["int4"] for row in stats.sensitivity for by_fmt in row]
    assert 0 < sum(int8) < sum(int4)
    out, spec, plan = tmp_path / "stats.json", tmp_path / "spec.json", tmp_path / "plan.json"
    assert run_cli("--model", f"tiny-{family}", "--out", str(out), "--spec-out", str(spec), "--tokens", "128",
                   "--batch", "2", "--seq-len", "32") == 0
    assert load_stats(out).counts == stats.counts
    assert cli.main(["plan", "--model", str(spec), "--cluster", "cpu4", "--loads", str(out), "--out", str(plan)]) == 0
    assert [layer.layer for layer in load_plan(plan).layers] == load_stats(out).layer_ids


@pytest.mark.parametrize("family", ["mixtral", "gpt-oss", "deepseek-v3"])
def test_sensitivity_equals_the_experts_module_with_quantized_weights(family, batches):
    model = hf.tiny_model(family)
    stats = calibrate(model, batches[:1], cap_factor=1e9)  # no sampling: every routed token counts
    x, ids, weights = capture_routed(model, batches[0], layer=0)
    experts = hf.moe_layers(model)[0][2]
    for expert in range(3):
        only_expert = weights.masked_fill(ids != expert, 0.0)  # the layer output of expert e alone
        quantized = copy.deepcopy(experts)
        with torch.no_grad():
            for w in hf.canonical_weights(quantized, expert):
                w.copy_(dequantize(quantize(w, "int4")))
            exact, approx = experts(x, ids, only_expert), quantized(x, ids, only_expert)
        reference = float((approx - exact).norm() / exact.norm())
        assert stats.sensitivity[0][expert]["int4"] == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_stats_do_not_depend_on_the_experts_implementation(implementation, batches):
    model = hf.tiny_model("mixtral")  # transformers' default on this machine: grouped_mm
    other = copy.deepcopy(model)
    other.set_experts_implementation(implementation)
    expected, got = calibrate(model, batches), calibrate(other, batches)
    assert other.config._experts_implementation == implementation != model.config._experts_implementation
    assert got.counts == expected.counts and got.coactivation == expected.coactivation
    torch.testing.assert_close(torch.tensor(got.gate_mass), torch.tensor(expected.gate_mass), rtol=1e-5, atol=0)
    for fmt in ("int8", "int4"):
        got_fmt, expected_fmt = ([[e[fmt] for e in row] for row in stats.sensitivity] for stats in (got, expected))
        torch.testing.assert_close(torch.tensor(got_fmt), torch.tensor(expected_fmt), rtol=1e-4, atol=0)


@pytest.mark.parametrize("family", ["olmoe", "qwen2-moe"])
def test_coactivation_margins_are_counts_times_top_k(family, batches):
    stats = calibrate(hf.tiny_model(family), batches)
    for layer, matrix in enumerate(stats.coactivation):
        assert [sum(row) for row in matrix] == [c * stats.top_k for c in stats.counts[layer]]
        assert [sum(col) for col in zip(*matrix)] == [c * stats.top_k for c in stats.counts[layer + 1]]


def test_gate_mass_sums_to_tokens_when_router_weights_are_normalised(batches):
    stats = calibrate(hf.tiny_model("mixtral"), batches)  # Mixtral renormalises its top-k weights
    tokens = sum(b.numel() for b in batches)
    assert all(sum(row) == pytest.approx(tokens) for row in stats.gate_mass)


def test_removal_importance_is_the_loss_change_with_the_expert_zeroed(batches):
    model = hf.tiny_model("mixtral")
    stats = calibrate(model, batches[:1], importance="removal")
    layer, expert = 1, max(range(8), key=lambda e: stats.counts[1][e])
    without = copy.deepcopy(model)
    experts = hf.moe_layers(without)[layer][2]
    with torch.no_grad():
        experts.gate_up_proj[expert].zero_()  # silu(0) * 0 = 0: the expert contributes nothing
        loss = float(model(input_ids=batches[0], labels=batches[0]).loss)
        loss_without = float(without(input_ids=batches[0], labels=batches[0]).loss)
    assert stats.importance[layer][expert] == pytest.approx(loss_without - loss, abs=1e-6)


def test_removal_progress_reports_one_forward_per_used_expert(batches):
    calls = []
    stats = calibrate(hf.tiny_model("olmoe"), batches[:1], importance="removal",
                      on_removal_forward=lambda done, total: calls.append((done, total)))
    used = sum(count > 0 for row in stats.counts for count in row)
    assert calls == [(done, used) for done in range(1, used + 1)]


def test_unrouted_expert_gets_sensitivity_and_zero_importance(batches):
    model = hf.tiny_model("gpt-oss")
    with torch.no_grad():
        model.model.layers[0].mlp.router.bias[5] = -1e4  # expert 5 of layer 0 is never picked
    stats = calibrate(model, batches[:1], importance="removal")
    assert stats.counts[0][5] == 0
    assert stats.importance[0][5] == 0.0
    assert 0 < stats.sensitivity[0][5]["int8"] < stats.sensitivity[0][5]["int4"]


def live_tensor_bytes() -> int:
    """Bytes of every tensor the Python heap still references."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # isinstance() on torch's deprecated module attributes
        return sum(t.numel() * t.element_size() for t in gc.get_objects() if isinstance(t, torch.Tensor))


def test_memory_held_between_batches_does_not_grow_with_the_number_of_batches():
    model, held = hf.tiny_model("mixtral"), []
    batches = token_batches(tokenize(builtin_text(), vocab_size=512), batch=2, seq_len=32, max_tokens=4 * 2 * 32)

    def stream():
        for batch in batches:
            held.append(live_tensor_bytes())  # before each forward: what calibration kept from the earlier ones
            yield batch

    calibrate(model, stream(), importance="removal")
    assert len(held) == 4 and len(set(held[1:])) == 1  # the first batch adds the fixed-size sums and 64 stored rows


def test_balanced_picks_cap_hot_experts_and_keep_rare_ones():
    flat_ids = torch.tensor([0] * 50 + [1] * 3 + [3] * 10)
    picks = dict(balanced_picks(flat_ids, num_experts=4, cap=8, generator=torch.Generator().manual_seed(0)))
    assert {e: p.numel() for e, p in picks.items()} == {0: 8, 1: 3, 3: 8}
    assert all(bool((flat_ids[p] == e).all()) and p.unique().numel() == p.numel() for e, p in picks.items())


def test_calibrating_a_saved_folder_equals_the_tiny_model(tmp_path):
    hf.tiny_model("qwen3-moe").save_pretrained(tmp_path / "ckpt")
    args = ("--tokens", "96", "--batch", "1", "--seq-len", "48")
    assert run_cli("--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a.json"), *args) == 0
    assert run_cli("--model", "tiny-qwen3-moe", "--out", str(tmp_path / "b.json"), *args) == 0
    folder, tiny = load_stats(tmp_path / "a.json"), load_stats(tmp_path / "b.json")
    assert folder.model == "ckpt" and tiny.model == "tiny-qwen3-moe"
    assert folder.counts == tiny.counts and folder.coactivation == tiny.coactivation


def dense_model_folder(folder):
    """A saved one-layer Llama (no experts) in `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case, message", [
    ("unknown family", r"unknown model family 'llama4', expected one of \[.*'mixtral'"),
    ("not a MoE model", r"not a MoE model \(model_type='llama'\)"),
    ("empty data file", r"empty.txt: data file has no text"),
    ("folder without weights", r"no weights \(\*\.safetensors or pytorch_model\*\.bin\)"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text(hf.tiny_config("mixtral").to_json_string())
    model = {"unknown family": "tiny-llama4", "not a MoE model": str(dense_model_folder(tmp_path / "dense")),
             "folder without weights": str(tmp_path / "config-only")}.get(case, "tiny-mixtral")
    data = str(tmp_path / "empty.txt") if case == "empty data file" else "builtin"
    out = tmp_path / "stats.json"
    assert cli.main(["calibrate", "--model", model, "--data", data, "--out", str(out), "--tokens", "64"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("rnq-ep calibrate: error: ") and re.search(message, error), error
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--tokens", "0"], r"--tokens 0: expected an integer in \[2, 2\*\*63\)"),
    (["--seq-len", "1"], r"--seq-len 1: expected an integer in \[2, 2\*\*63\)"),
    (["--cap-factor", "nan"], r"cap_factor: must be a finite number > 0, got nan"),
    (["--formats", "int3"], r"formats: \['int3'\] is not a non-empty subset"),
    (["--data", "no-such.txt"], r"--data no-such.txt: no such file"),
])
def test_bad_flags_are_refused_before_loading_the_model(flags, message, tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "load_model", lambda *args: pytest.fail("the model was loaded before the flags were checked"))
    with pytest.raises(SpecError, match=message):
        run_cli("--model", "tiny-mixtral", "--out", str(tmp_path / "s.json"), *flags)
    assert not (tmp_path / "s.json").exists()


def test_the_builtin_data_name_is_textdatas():
    assert BUILTIN == textdata.BUILTIN


def test_bad_flags_are_refused_without_importing_torch(tmp_path):
    code = "import sys; from rnq_ep.cli import main; code = main(sys.argv[1:]); assert 'torch' not in sys.modules; sys.exit(code)"
    done = subprocess.run([sys.executable, "-c", code, "calibrate", "--model", "tiny-mixtral", "--tokens", "0", "--out",
                           str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "rnq-ep calibrate: error: --tokens 0: expected an integer in [2, 2**63)\n"


def test_missing_out_folder_is_refused_before_loading_the_model(tmp_path):
    with pytest.raises(SpecError, match=r"--out .*stats.json: folder .*absent does not exist"):
        run_cli("--model", "tiny-llama4", "--out", str(tmp_path / "absent" / "stats.json"))


def test_an_out_path_that_is_a_folder_is_refused_before_loading_the_model(tmp_path):
    with pytest.raises(SpecError, match=r"--out .*: is a folder, expected a file path"):
        run_cli("--model", "tiny-llama4", "--out", str(tmp_path))


def test_empty_data_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SpecError, match="data file has no text"):
        run_cli("--model", "tiny-mixtral", "--data", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "s.json"))
    assert not (tmp_path / "s.json").exists()


def test_unknown_format_is_rejected(batches):
    with pytest.raises(SpecError, match=r"formats: \['int3'\]"):
        calibrate(hf.tiny_model("mixtral"), batches, formats=("int3",))


def test_tokenizer_in_the_model_folder_is_used(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["the cat sat on the mat"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    hf.tiny_model("olmoe").save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(tmp_path)
    (tmp_path / "cats.txt").write_text("the cat sat on the mat " * 20)
    assert run_cli("--model", str(tmp_path), "--data", str(tmp_path / "cats.txt"), "--out", str(tmp_path / "s.json"),
                   "--seq-len", "20") == 0
    assert sum(load_stats(tmp_path / "s.json").counts[0]) == 120 * 4  # 6 words x 20, not 460 bytes
