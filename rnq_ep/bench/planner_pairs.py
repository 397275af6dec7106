"""Balance over every ordered pair of real load files of one model: does R&Q at plain-EP memory beat the
EPLB-equivalent with 12.5 % more memory when the loads it is scored on are not the ones it planned on?

The per-pair table (`balance_table`) shows a few chosen pairs; this one counts wins over all of them,
so a claim does not rest on which pairs were picked. Files of one model and source are grouped by
their name up to the corpus (`olmoe-1b-7b-0924_olmoe-repo_arxiv.json` -> `olmoe-1b-7b-0924_olmoe-repo`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import numpy as np

from rnq_ep.bench.planner import WITH_INT4, BenchTable, with_budget
from rnq_ep.metrics import score_plan
from rnq_ep.planner import plan_eplb, plan_rnq
from rnq_ep.specs import ClusterSpec, LoadStats, PlanOptions, load_model, load_stats

# (model config, file-name prefix of one source's corpora); only groups with >= 2 files are used
PAIR_GROUPS = (
    ("olmoe-1b-7b", "olmoe-1b-7b-0924_olmoe-repo_"),
    ("mixtral-8x7b", "mixtral-8x7b-v0.1_olmoe-repo_"),
    ("mixtral-8x7b", "mixtral-8x7b-v0.1_fiddler_"),
    ("mixtral-8x7b", "mixtral-8x7b-instruct_fiddler_"),
)


def pair_ratios(
    model_name: str, files: list[Path], cluster: ClusterSpec, options: PlanOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per ordered pair of `files` (plan on one, score on another): R&Q / EPLB +12.5 % best-split balancedness,
    as (median over layers [P], mean over layers [P], R&Q with int4 allowed, median over layers [P])."""
    model = load_model(model_name)
    stats: dict[Path, LoadStats] = {f: load_stats(f, model) for f in files}
    with_int4 = msgspec.structs.replace(options, formats=WITH_INT4)
    same_budget = with_budget(cluster, model, options)  # as compare_policies gives the EPLB-equivalent
    median, mean, int4 = [], [], []
    for plan_on, score_on in itertools.permutations(files, 2):
        best = lambda plan: score_plan(plan, stats[score_on]).balancedness_best  # noqa: E731  [L]
        rnq = best(plan_rnq(model, cluster, stats[plan_on], options))
        eplb = best(plan_eplb(model, same_budget, stats[plan_on], extra_memory=0.125))
        rnq4 = best(plan_rnq(model, cluster, stats[plan_on], with_int4))
        median.append(np.median(rnq) / np.median(eplb))
        mean.append(rnq.mean() / eplb.mean())
        int4.append(np.median(rnq4) / np.median(eplb))
    return np.array(median), np.array(mean), np.array(int4)


def all_pairs_table(cluster: ClusterSpec, options: PlanOptions, folder: Path) -> BenchTable | None:
    """Wins of R&Q over EPLB +12.5 % on every ordered pair of each group of files in `folder`; None if none has 2."""
    header = ("files", "model", "ordered pairs", "R&Q <= EPLB +12.5 % (median over layers)", "same, mean over layers",
              "R&Q / EPLB +12.5 %: median pair", "worst pair", f"R&Q {'+'.join(WITH_INT4)} <= EPLB +12.5 % (median)")
    rows = []
    for model_name, prefix in PAIR_GROUPS:
        files = sorted(folder.glob(f"{prefix}*.json"))
        if len(files) < 2:
            continue
        median, mean, int4 = pair_ratios(model_name, files, cluster, options)
        wins = lambda ratio: f"{int((ratio <= 1 + 1e-9).sum())} / {len(ratio)}"  # noqa: E731
        rows.append((f"{prefix}*", model_name, str(len(median)), wins(median), wins(mean),
                     f"{np.median(median):.3f}", f"{median.max():.3f}", wins(int4)))
    if not rows:
        return None
    title = (f"Balance over every ordered pair of real load files (plan on one corpus, score on another), {cluster.name}, "
             "memory as plain EP: pairs where R&Q's best-split balancedness is no worse than the EPLB-equivalent's "
             "with 12.5 % more memory")
    note = ("A ratio < 1: R&Q is better balanced. Mixtral-8x7B has 8 experts, one per GPU on 8 GPUs: bf16+int8 cannot "
            "replicate there (two int8 copies are just over one bf16 slot) and plans plain EP, as does the "
            "EPLB-equivalent, whose 12.5 % buys no whole slot.")
    return BenchTable(title, header, rows, note)
