"""Regenerate BENCHMARKS.md: run every bench program, then stitch their markdown with machine, command and date.

    python scripts/benchmarks.py [--skip planner,simulate,layer,kernels] [--out BENCHMARKS.md]

Each program writes its own fragment (and plot) under bench/; every ratio in a fragment is against
a baseline measured in the same run of that program. A program that cannot run here (the layer
bench when its module is missing, the kernel bench without CUDA) leaves a line saying why.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rnq_ep.cli import cpu_name

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SIMULATE = [sys.executable, "-m", "rnq_ep.simulate"]
SYNTHETIC_MODELS = ("deepseek-v3", "qwen3-235b-a22b", "gpt-oss-120b", "mixtral-8x22b")
LOADS = ROOT / "configs" / "loads"
# (label, model, plan-on file, score-on file): the most and the least skewed real loads shipped
REAL_LOADS = (
    ("OLMoE, arxiv -> github (most skewed)", "olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_arxiv.json",
     "olmoe-1b-7b-0924_olmoe-repo_github.json"),
    ("Mixtral-8x7B, github, in sample (least skewed)", "mixtral-8x7b", "mixtral-8x7b-v0.1_olmoe-repo_github.json", None),
)
RNQ_PREFIX = "R&Q"
WHY_RNQ_LOSES = """\
R&Q trades memory for replicas: at plain-EP memory a GPU that holds one bf16 expert per layer
(256 or more GPUs for 256 experts, 8 or more for Mixtral's 8) has no room for a second bf16 or
int8 copy (an int8 expert is just over half a bf16 one), so bf16+int8 R&Q is plain EP or the
EPLB-equivalent there, and only int4 copies (about a quarter) create replicas. Its placement is
also planned on a past window: when the hot set drifts (the `drift` of the synthetic loads, or
another corpus in the real files), a newly hot expert has few copies and least-loaded routing can
only share its tokens among those. LLEP re-balances every step and so ignores drift, but pays for
moving bf16 expert weights over the network, which dominates when experts are large (Mixtral,
about 0.6 GB per expert) or the skew is mild. At low skew (Mixtral's 8 experts, Zipf s <= 0.4)
there is little imbalance to remove, and the quantized copies' bytes buy nothing over the
EPLB-equivalent that has 12.5-25 % more memory.
"""


def simulate_runs() -> list[tuple[str, list[str], str, bool]]:
    """(section title, simulate arguments, fragment stem, plot?) of every `rnq-ep simulate` run."""
    runs = [(f"{m}, synthetic Zipf s=0.6, hot-set drift 0.1 (the default run)", ["--model", m], f"simulate-{m}", True)
            for m in SYNTHETIC_MODELS]
    for drift, label in (("0", "no hot-set drift (scored on the hot sets it was planned on)"), ("0.5", "hot-set drift 0.5")):
        runs.append((f"deepseek-v3, {label}", ["--model", "deepseek-v3", "--loads", f"zipf:0.6:drift={drift}",
                     "--gpus", "32,256,1024", "--sweep", "none"], f"simulate-deepseek-v3-drift{drift}", False))
    for label, model, plan_on, score_on in REAL_LOADS:
        args = ["--model", model, "--gpus", "8,32,64", "--loads", str(LOADS / plan_on), "--sweep", "none"]
        args += ["--eval-loads", str(LOADS / score_on)] if score_on else []
        runs.append((f"Real loads: {label}", args, f"simulate-{model}-real", True))
    return runs


def run(command: list[str], log: list[str]) -> bool:
    """Run a bench command from the repo root, note its wall time; True when it exits 0."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - start
    log.append(f"`{shlex.join(Path(c).name if c == sys.executable else c for c in command)}`: {took:.0f} s, exit {done.returncode}")
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
    return done.returncode == 0


def fragment(path: Path, failed: str) -> str:
    """A program's markdown, or a line saying it did not produce one."""
    return path.read_text() if path.exists() else f"_not measured: {failed}_\n"


def rnq_losses(markdown: str) -> list[str]:
    """GPU counts of a simulate fragment where the best R&Q variant is slower than the best other policy."""
    best: dict[str, dict[str, tuple[float, str]]] = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 4 or not cells[0].isdigit() or not cells[2].replace(",", "").isdigit():
            continue
        group = "rnq" if cells[1].startswith(RNQ_PREFIX) else "other"
        time_us = float(cells[2].replace(",", ""))
        current = best.setdefault(cells[0], {}).get(group)
        if current is None or time_us < current[0]:
            best[cells[0]][group] = (time_us, cells[1])
    losses = []
    for gpus, by in best.items():
        if "rnq" in by and "other" in by and by["rnq"][0] > by["other"][0]:
            losses.append(f"{gpus} GPUs: {by['rnq'][1]} {by['rnq'][0] / by['other'][0]:.2f}x the time of {by['other'][1]}")
    return losses


def build(skip: set[str]) -> str:
    """Run the programs not in `skip`; return the BENCHMARKS.md text."""
    BENCH.mkdir(exist_ok=True)
    log, parts, losses = [], [], []
    if "planner" not in skip:
        run(["rnq-ep", "bench", "planner", "--markdown", str(BENCH / "planner.md")], log)
        parts += ["## Planner speed and balance (`rnq-ep bench planner`)", "", fragment(BENCH / "planner.md", "run failed")]
    if "simulate" not in skip:
        parts += ["## Scale study on the cost model (`rnq-ep simulate`)", "",
                  "Policies at plain-EP memory unless named: plain EP; EPLB-equivalent with 12.5 % / 25 % more memory and "
                  "hash or least-loaded copy choice; LLEP-style spilling (lambda 1.3, chunks >= 1024 tokens, weight moves "
                  "counted); R&Q with least-loaded routing. Each plans on one window and is scored on the next.", ""]
        for title, args, stem, plot in simulate_runs():
            md, png = BENCH / f"{stem}.md", BENCH / f"{stem}.png"
            run([*SIMULATE, *args, "--markdown", str(md), *(["--plot", str(png)] if plot else [])], log)
            text = fragment(md, "run failed").replace(f"]({png.name})", f"](bench/{png.name})")
            parts += [f"### {title}", "", text, ""]
            losses += [f"{stem.removeprefix('simulate-')}, {loss}" for loss in rnq_losses(text)]
    parts += ["## EP layer on CPU gloo ranks (`python -m rnq_ep.bench.layer`)", ""]
    if "layer" in skip:
        parts.append("_not measured in this run (skipped)_\n")
    elif importlib.util.find_spec("rnq_ep.bench.layer") is None:
        parts.append("_not measured: rnq_ep.bench.layer is not in this checkout_\n")
    else:
        run([sys.executable, "-m", "rnq_ep.bench.layer", "--markdown", str(BENCH / "layer.md")], log)
        parts.append(fragment(BENCH / "layer.md", "run failed"))
    parts += ["## Kernels (`python -m rnq_ep.bench.kernels`)", ""]
    if "kernels" in skip or not cuda_available():
        parts.append("_not measured: no GPU in this run_\n")
    else:
        run([sys.executable, "-m", "rnq_ep.bench.kernels", "--output", str(BENCH / "kernels.md")], log)
        parts.append(fragment(BENCH / "kernels.md", "run failed"))
    if losses:
        parts += ["## Where R&Q loses", "", "In this run the best R&Q variant was slower than the best other policy at:", "",
                  *(f"- {loss}" for loss in losses), "", WHY_RNQ_LOSES]
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = ["# Benchmarks", "", f"Regenerated by `python scripts/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip() + "  ",
            f"Machine: {machine}  ", f"Date: {date}", "", "Programs run (wall time):", "", *(f"- {line}" for line in log), ""]
    return "\n".join(head + parts)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (checked in a child, so this script does not import torch)."""
    probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True)
    return probe.returncode == 0


def main() -> int:
    """Parse flags, run the benches, write BENCHMARKS.md; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma list of planner, simulate, layer, kernels")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    text = build({s for s in args.skip.split(",") if s})
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
