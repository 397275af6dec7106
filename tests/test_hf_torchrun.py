"""`rnq-ep run --hf` under torchrun: two real processes generate what the original model generates."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_hf import one_torch_thread  # noqa: F401  (fixture; the import skips without transformers)
from rnq_ep import hf
from rnq_ep.planner import plan_plain_ep
from rnq_ep.specs import ClusterSpec, LoadStats, encode_json
from rnq_ep.textdata import builtin_text, token_batches, tokenize

REPO = Path(__file__).resolve().parent.parent
PROMPT_LEN, NEW_TOKENS = 16, 4


def expected_generation(model: torch.nn.Module, rank: int, world_size: int) -> list[int]:
    """The unconverted model's greedy ids after rank's prompt (its row of the builtin text, as run_on_rank takes it)."""
    ids = tokenize(builtin_text(), model.config.vocab_size)
    prompt = token_batches(ids, world_size, PROMPT_LEN, world_size * PROMPT_LEN)[0][rank : rank + 1]
    with torch.no_grad():
        tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return tokens[0, PROMPT_LEN:].tolist()


def write_plain_ep_plan(path: Path, model: torch.nn.Module, num_gpus: int) -> str:
    """A plain-EP plan of tiny-mixtral on num_gpus CPU "GPUs", written to path."""
    stats = LoadStats(counts=[[1] * 8] * 3, num_experts=8, top_k=2)
    cluster = ClusterSpec(
        name="cpus", nodes=1, gpus_per_node=num_gpus, hbm_bytes_per_s=1e10, peak_flops=5e10,
        intra_node_bytes_per_s=5e9, inter_node_bytes_per_s=5e9, device="cpu",
    )
    path.write_bytes(encode_json(plan_plain_ep(hf.model_spec(model, "tiny-mixtral"), cluster, stats)))
    return str(path)


def generated_ids(stdout: str) -> dict[int, list[int]]:
    """rank -> generated ids, read from the printed generation table."""
    rows = re.findall(r"│\s*(\d)\s*│\s*([\d ]+?)\s*│\s*[\d.]+\s*│\s*[\d.]+\s*│", stdout)
    return {int(rank): list(map(int, ids.split())) for rank, ids in rows}


def test_torchrun_hf_alone_generates_the_original_tokens(tmp_path, capsys):
    from rnq_ep.runtime.torchrun import main

    model = hf.tiny_model("mixtral")
    plan = write_plain_ep_plan(tmp_path / "plan.json", model, 1)
    assert main(["--hf", "tiny-mixtral", "--plan", plan, "--tokens", str(PROMPT_LEN), "--steps", str(NEW_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert generated_ids(out) == {0: expected_generation(model, 0, 1)}, out


@pytest.mark.slow
def test_torchrun_hf_on_two_ranks_generates_the_original_tokens(tmp_path):
    model = hf.tiny_model("mixtral")
    plan = write_plain_ep_plan(tmp_path / "plan.json", model, 2)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "rnq_ep.runtime.torchrun", "--hf", "tiny-mixtral", "--plan", plan,
         "--tokens", str(PROMPT_LEN), "--steps", str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=240, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert generated_ids(done.stdout) == {rank: expected_generation(model, rank, 2) for rank in (0, 1)}, done.stdout
    balance = re.findall(r"│\s*(\d)\s*│\s*(\d+\.\d+)\s*│", done.stdout.split("balancedness per MoE layer")[1])
    assert [int(layer) for layer, _ in balance] == [0, 1, 2] and all(float(v) >= 1.0 for _, v in balance)


def test_torchrun_hf_with_model_is_bad_input(tmp_path, caplog):
    from rnq_ep.runtime.torchrun import main

    assert main(["--hf", "tiny-mixtral", "--model", "tiny", "--plan", str(tmp_path / "plan.json")]) == 2
    assert "--model tiny and --hf tiny-mixtral: give one" in caplog.text
