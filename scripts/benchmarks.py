"""Regenerate BENCHMARKS.md: run every bench program, then stitch their markdown with machine, command and date.

    python scripts/benchmarks.py [--skip planner,simulate,step,layer,e2e,rebalance,kernels] [--out BENCHMARKS.md]

Each program writes its own fragment (and plot) under bench/; the fragments are stitched into
BENCHMARKS.md and removed, the PNGs stay next to it. Every ratio in a fragment is against
a baseline measured in the same run of that program. A program that cannot run here (the kernel
bench without CUDA) leaves a line saying why.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rnq_ep.report import cpu_name
from rnq_ep.specs import write_atomic

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SIMULATE = [sys.executable, "-m", "rnq_ep.simulate"]
SYNTHETIC_MODELS = ("deepseek-v3", "qwen3-235b-a22b", "gpt-oss-120b", "mixtral-8x22b")
LOADS = "configs/loads"  # relative to ROOT, where the programs run
# (label, fragment stem, model, plan-on file, score-on file | "sampled" | None): the most and the least skewed
# real loads shipped; a score-on file: 8 windows drawn from it, static plans vs re-planned every 10 steps;
# "sampled": 4 windows drawn from the plan-on file (stationary traffic of its domain)
REAL_LOADS = (
    ("OLMoE, arxiv -> github served for 8 windows, static vs re-planned every 10 steps (most skewed, a shift of "
     "domain)", "olmoe-1b-7b-replan", "olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_arxiv.json",
     "olmoe-1b-7b-0924_olmoe-repo_github.json"),
    ("OLMoE, arxiv, stationary: windows drawn from the file (most skewed, no shift)", "olmoe-1b-7b-stationary",
     "olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_arxiv.json", "sampled"),
    ("Mixtral-8x7B, github, in sample (least skewed)", "mixtral-8x7b-real", "mixtral-8x7b",
     "mixtral-8x7b-v0.1_olmoe-repo_github.json", None),
)
RNQ_PREFIX, SPILL_SUFFIX = "R&Q", " spill"  # R&Q variants; R&Q + int8/int4 spill (per-step weight moves, extra memory)
REPLAN_SUFFIX = " + re-plan"  # re-planned every --replan-interval steps (runs of a shift served for several windows)
PLAIN, EPLB_HASH, EPLB_LEAST, LLEP = "plain EP", "EPLB +12.5 % mem, hash", "EPLB +12.5 % mem, least-loaded", "LLEP spill"
EPLB_REPLAN = EPLB_LEAST + REPLAN_SUFFIX
SUMMARY_HEADER = [
    "| run | GPUs | fastest | best static R&Q | R&Q speedup vs plain EP | vs EPLB +12.5 % hash "
    "| vs EPLB +12.5 % least-loaded | vs LLEP | R&Q + re-plan vs plain EP | R&Q + re-plan vs EPLB +12.5 % "
    "least-loaded + re-plan | best R&Q + spill vs LLEP |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
WHY_RNQ_LOSES = """\
Why, as read from the run of 2026-11-26 (the list above and the summary are recomputed on every
run; this paragraph is not):

- **One bf16 expert per GPU leaves R&Q no room.** Plain-EP memory is ceil(E/G) bf16 experts per
  layer, so from G = E on (DeepSeek-V3 at 256 and 1024 GPUs, Qwen3 and gpt-oss at 256 and 1024,
  OLMoE at 64, Mixtral everywhere) a GPU holds one expert. An int8 copy is just over half a bf16
  one, so bf16+int8 R&Q cannot add a replica and ends up as the EPLB-equivalent (both spread the
  G/E slots per expert by load); only int4 copies (about a quarter) make room, and the 25 %
  quality budget (tokens allowed on quantized copies) caps how many.
- **Drift makes any placement stale; LLEP re-balances every step.** R&Q and EPLB plan on the
  previous window. DeepSeek-V3 at 1024 GPUs: with no hot-set drift R&Q int4 is the fastest policy
  (2.65x faster than LLEP); with drift 0.1 or 0.5 LLEP is (R&Q takes 2.1x and 4.6x its time),
  because a newly hot expert has few copies and least-loaded routing can only share its tokens
  among those. The real OLMoE loads planned on arxiv and served as github traffic (8 windows drawn
  from the github file, a shift of corpus) are such a case: a static R&Q plan is 1.35x / 1.20x /
  1.50x faster than plain EP at 8 / 32 / 64 GPUs and LLEP is faster still at 32 and 64. Re-planned
  every 10 steps from the last window's counts (the runtime's rebalancer, moves charged), R&Q is
  1.50x / 2.27x / 3.27x faster than plain EP, level with the EPLB-equivalent that also re-plans and
  has 12.5 % more memory at 8 GPUs (1.00x its time) and 2.0-3.3x ahead of it at 32 and 64 (its extra
  memory buys no whole replica there); LLEP (7x plain EP's expert memory at 64 GPUs) and R&Q + int4
  spill stay faster at 32 and 64. GitHub traffic served stationary (planned on github windows, not
  arxiv; measured separately, docs/policies.md) gives R&Q 1.55x / 2.54x / 3.92x: over 32 windows
  re-planning reaches 1.54x / 2.54x / 3.74x, all but the stale first interval of it.
- **Where the others are already balanced, quantized copies only cost.** Mixtral at 64 GPUs and
  more: 8 experts over 64+ one-expert GPUs lets the EPLB-equivalent split every expert by load,
  and R&Q's int4 copies add dequantisation FLOPs to a compute-bound step, so the best R&Q is the
  bf16+int8 one, identical to the EPLB-equivalent. At 8 GPUs the EPLB-equivalent with 12.5-25 %
  more memory beats R&Q by up to 2 % on the synthetic loads, and at
  32 GPUs the one with 25 % more memory by 7-8 % (DeepSeek-V3, gpt-oss): its extra bytes hold
  whole bf16 replicas, while R&Q at plain-EP memory pays for every replica by quantizing other
  copies within the 25 % budget.
- **LLEP loses where expert weights are large.** Every spill moves a bf16 expert over the network
  (576 MiB for Mixtral-8x22B), so on Mixtral LLEP takes 1.4-5x the time of the best policy.
- **R&Q + quantized spill closes most of the drift gap.** LLEP's spill rule on top of R&Q's
  placement and least-loaded routing, sending int4 copies, is faster than LLEP in every row of the
  summary (1.09-5.2x), because it spills only what R&Q's replicas could not absorb and a
  move costs a quarter of LLEP's bytes. Its price is quality: spilled tokens are quantized, so its
  quantized-token fraction passes the planner's 25 % budget. The runtime runs it (`rnq-ep run
  --spill int4`, `SpillMoE`); the end-to-end section measures it on CPU workers.
"""


def simulate_runs() -> list[tuple[str, list[str], str, bool]]:
    """(section title, simulate arguments, fragment stem, plot?) of every `rnq-ep simulate` run."""
    runs = [(f"{m}, synthetic Zipf s=0.6, hot-set drift 0.1 (default settings)", ["--model", m], f"simulate-{m}", True)
            for m in SYNTHETIC_MODELS]
    for drift, label in (("0", "no hot-set drift (scored on the hot sets it was planned on)"), ("0.5", "hot-set drift 0.5")):
        runs.append((f"deepseek-v3, {label}", ["--model", "deepseek-v3", "--loads", f"zipf:0.6:drift={drift}",
                     "--gpus", "32,256,1024", "--sweep", "none"], f"simulate-deepseek-v3-drift{drift}", False))
    runs.append(("deepseek-v3 at decode, 64 tokens per GPU (collective latency modelled; R&Q's layout and quota "
                 "kernels not: see docs/runtime.md)",
                 ["--model", "deepseek-v3", "--tokens-per-gpu", "64", "--sweep", "none"], "simulate-deepseek-v3-decode",
                 False))
    for label, stem, model, plan_on, score_on in REAL_LOADS:
        args = ["--model", model, "--gpus", "8,32,64", "--loads", f"{LOADS}/{plan_on}", "--sweep", "none"]
        if score_on == "sampled":
            args += ["--eval-loads", "sampled", "--windows", "4"]
        elif score_on:
            args += ["--eval-loads", f"{LOADS}/{score_on}", "--windows", "8"]
        runs.append((f"Real loads: {label}", args, f"simulate-{stem}", True))
    return runs


class RunLog:
    """The wall time of every program run so far (BENCHMARKS.md lists them) and progress lines on stderr."""

    def __init__(self, total: int) -> None:
        """`total`: how many programs this run will start."""
        self.total = total
        self.lines: list[str] = []
        self.start = time.perf_counter()

    def started(self, command: list[str]) -> None:
        """Say on stderr which program starts, i of n, and the time since the run began."""
        sys.stderr.write(f"[{len(self.lines) + 1}/{self.total}, {time.perf_counter() - self.start:.0f} s] {_shown(command)}\n")
        sys.stderr.flush()


def _shown(command: list[str]) -> str:
    """The command as BENCHMARKS.md shows it (the interpreter by its file name)."""
    return shlex.join(Path(c).name if c == sys.executable else c for c in command)


def program_count(skip: set[str], cuda: bool) -> int:
    """How many programs `build(skip)` starts: one per bench section and simulate run not skipped."""
    counts = {"planner": 1, "simulate": len(simulate_runs()), "step": 1, "layer": 2, "e2e": 2, "rebalance": 1,
              "kernels": int(cuda)}
    return sum(n for name, n in counts.items() if name not in skip)


def run(command: list[str], log: RunLog) -> bool:
    """Run a bench command from the repo root, note its wall time; True when it exits 0."""
    return _run(command, log).returncode == 0


def bench_section(
    name: str, title: str, skip: set[str], log: RunLog, extra: tuple[str, ...] = (), stem: str = ""
) -> list[str]:
    """Heading + markdown of `python -m rnq_ep.bench.<name> [extra] --markdown bench/<stem>.md`, or why it is missing."""
    stem = stem or name
    heading = [f"## {title} (`python -m rnq_ep.bench.{name}{''.join(' ' + a for a in extra)}`)", ""]
    if name in skip:
        return [*heading, "_not measured in this run (skipped)_\n"]
    run([sys.executable, "-m", f"rnq_ep.bench.{name}", *extra, "--markdown", f"bench/{stem}.md"], log)
    return [*heading, fragment(BENCH / f"{stem}.md", "run failed")]


def stdout_of(command: list[str], log: RunLog) -> str:
    """Run a bench that prints its markdown to stdout; that text, or a line saying it failed."""
    done = _run(command, log)
    return done.stdout if done.returncode == 0 else "_not measured: run failed_\n"


def _run(command: list[str], log: RunLog) -> subprocess.CompletedProcess:
    """Run `command` from the repo root, capturing its output; note its wall time and exit code in `log`."""
    log.started(command)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - start
    log.lines.append(f"`{_shown(command)}`: {took:.0f} s, exit {done.returncode}")
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
    return done


def fragment(path: Path, failed: str) -> str:
    """A program's markdown (the file is removed: BENCHMARKS.md holds it), or a line saying it did not produce one."""
    if not path.exists():
        return f"_not measured: {failed}_\n"
    text = path.read_text()
    path.unlink()
    return text


def scale_rows(markdown: str) -> dict[int, dict[str, float]]:
    """MoE us/layer per GPU count and policy, read from a simulate fragment's scale table."""
    times: dict[int, dict[str, float]] = {}
    in_scale_table = False
    for line in markdown.splitlines():
        if line.startswith("**"):  # a table title; the skew sweep's rows look alike
            in_scale_table = line.startswith("**rnq-ep simulate")
        cells = [c.strip() for c in line.strip("|").split("|")]
        if in_scale_table and len(cells) > 3 and cells[0].isdigit() and cells[2].replace(",", "").isdigit():
            times.setdefault(int(cells[0]), {})[cells[1]] = float(cells[2].replace(",", ""))
    return times


def best_of(times: dict[str, float], kind: str) -> tuple[str, float]:
    """(policy, us) of the fastest of a kind: 'rnq' (static R&Q at plain-EP memory), 'replan' (R&Q + re-plan),
    'spill' (R&Q + spill) or 'other' (not R&Q, static or re-planned); ('-', NaN) when the run has none."""
    def kind_of(name: str) -> str:
        if not name.startswith(RNQ_PREFIX):
            return "other"
        return "spill" if name.endswith(SPILL_SUFFIX) else "replan" if name.endswith(REPLAN_SUFFIX) else "rnq"

    pool = {name: t for name, t in times.items() if kind_of(name) == kind}
    if not pool:
        return "-", float("nan")
    name = min(pool, key=pool.get)
    return name, pool[name]


def rnq_losses(markdown: str) -> list[str]:
    """GPU counts of a simulate fragment where the best R&Q variant at plain-EP memory (static or re-planned) is
    slower than the best other policy."""
    losses = []
    for gpus, times in scale_rows(markdown).items():
        rnq, rnq_us = min(best_of(times, "rnq"), best_of(times, "replan"), key=lambda best: (best[1] != best[1], best[1]))
        other, other_us = best_of(times, "other")
        if rnq_us > other_us:
            losses.append(f"{gpus} GPUs: {rnq} {rnq_us / other_us:.2f}x the time of {other}")
    return losses


def summary_rows(name: str, markdown: str) -> list[str]:
    """Markdown rows: per GPU count the fastest policy and the best R&Q's speedup over the baselines."""
    rows = []
    for gpus, times in scale_rows(markdown).items():
        fastest = min(times, key=times.get)
        ties = sum(t == times[fastest] for t in times.values()) - 1
        fastest += f" (tied with {ties} more)" if ties else ""
        rnq, rnq_us = best_of(times, "rnq")
        replan_us = best_of(times, "replan")[1]
        vs = [times[b] / rnq_us for b in (PLAIN, EPLB_HASH, EPLB_LEAST, LLEP)]
        vs += [times[PLAIN] / replan_us, times.get(EPLB_REPLAN, float("nan")) / replan_us]
        vs.append(times[LLEP] / best_of(times, "spill")[1])
        cells = ["—" if v != v else f"{v:.2f}x" for v in vs]  # v != v: NaN, the policy is not in the run
        rows.append(f"| {name} | {gpus} | {fastest} | {rnq} | " + " | ".join(cells) + " |")
    return rows


def build(skip: set[str]) -> str:
    """Run the programs not in `skip`; return the BENCHMARKS.md text."""
    BENCH.mkdir(exist_ok=True)
    cuda = "kernels" not in skip and cuda_available()
    log, parts, losses, summary = RunLog(program_count(skip, cuda)), [], [], []
    if "planner" not in skip:
        run(["rnq-ep", "bench", "planner", "--markdown", "bench/planner.md"], log)
        parts += ["## Planner speed and balance (`rnq-ep bench planner`)", "", fragment(BENCH / "planner.md", "run failed")]
    if "simulate" not in skip:
        parts += ["## Scale study on the cost model (`rnq-ep simulate`)", "",
                  "Policies at plain-EP memory unless named: plain EP; EPLB-equivalent with 12.5 % / 25 % more memory and "
                  "hash or least-loaded copy choice; LLEP-style spilling (lambda 1.3, chunks >= 1024 tokens, weight moves "
                  "counted); R&Q with least-loaded routing; and R&Q + int8/int4 spill: R&Q's placement and routing, then "
                  "LLEP's spill rule on what is still over 1.3x the mean, sending quantized copies (docs/policies.md; the "
                  "runtime runs LLEP and the spill hybrids as `SpillMoE`, see the end-to-end section). Each plans on one "
                  "window and is scored on the next. "
                  "Hot-set drift is the fraction of rank positions whose experts are re-drawn between windows: "
                  "drift 0.1 keeps about 92 % of a layer's top-8 experts and 0.5 about 61 %; the shipped OLMoE "
                  "files keep 62 % from arxiv to github and 17 % from github to wikipedia (measured 2026-11-25).", ""]
        for title, args, stem, plot in simulate_runs():
            md, png = BENCH / f"{stem}.md", BENCH / f"{stem}.png"
            run([*SIMULATE, *args, "--markdown", f"bench/{md.name}", *(["--plot", f"bench/{png.name}"] if plot else [])], log)
            text = fragment(md, "run failed").replace(f"]({png.name})", f"](bench/{png.name})")
            parts += [f"### {title}", "", text, ""]
            losses += [f"{stem.removeprefix('simulate-')}, {loss}" for loss in rnq_losses(text)]
            summary += summary_rows(stem.removeprefix("simulate-"), text)
    parts += bench_section("step", "One layer step's control path: host time, syncs, kernel launches", skip, log)
    parts += bench_section("layer", "EP layer on CPU gloo ranks", skip, log)
    parts += bench_section("layer", "EP layer, the most skewed real layer, on CPU gloo ranks", skip, log,
                           extra=("--most-skewed", "--repeats", "5"), stem="layer-skewed")
    parts += bench_section("e2e", "Every policy end to end on 4 CPU workers, spawned and Ray", skip, log)
    parts += bench_section("e2e", "Spilling end to end: OLMoE planned on arXiv, run on Wikipedia, 1024 tokens per worker",
                           skip, log, extra=("--cases", "olmoe-shift", "--launcher", "spawn", "--tokens", "1024"),
                           stem="e2e-spill")
    parts += ["## Online rebalancing: the stall of a switch (`python -m rnq_ep.bench.rebalance`)", ""]
    if "rebalance" in skip:
        parts.append("_not measured in this run (skipped)_\n")
    else:
        parts.append(stdout_of([sys.executable, "-m", "rnq_ep.bench.rebalance", "--rounds", "5"], log))
    parts += ["## Kernels (`python -m rnq_ep.bench.kernels`)", ""]
    if not cuda:
        parts.append("_not measured: no GPU in this run_\n")
    else:
        run([sys.executable, "-m", "rnq_ep.bench.kernels", "--output", "bench/kernels.md"], log)
        parts.append(fragment(BENCH / "kernels.md", "run failed"))
    if losses:
        parts += ["## Where R&Q loses", "", "In this run the best R&Q variant was slower than the best other policy at:", "",
                  *(f"- {loss}" for loss in losses), "", WHY_RNQ_LOSES]
    machine = f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = ["# Benchmarks", "", f"Regenerated by `{shlex.join(['python', f'scripts/{Path(__file__).name}', *sys.argv[1:]])}`  ",
            f"Machine: {machine}  ", f"Date: {date}", "", "Programs run (wall time):", "", *(f"- {line}" for line in log.lines), ""]
    if summary:
        head += ["## Summary of the scale study (speedup > 1: R&Q is faster; each row is one run, its own baselines)", "",
                 *SUMMARY_HEADER, *summary, ""]
    return "\n".join(head + parts)


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (checked in a child, so this script does not import torch)."""
    probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True)
    return probe.returncode == 0


def main() -> int:
    """Parse flags, run the benches, write BENCHMARKS.md; 0 on success."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma list of planner, simulate, layer, e2e, rebalance, kernels")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    start = time.perf_counter()
    text = build({s for s in args.skip.split(",") if s})
    write_atomic(args.out, text.encode())
    sys.stderr.write(f"wrote {args.out} after {time.perf_counter() - start:.0f} s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
