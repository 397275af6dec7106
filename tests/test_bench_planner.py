"""bench.planner: policy comparison helpers, synthetic Zipf loads, real-load balance table."""

import itertools

import numpy as np
from handmade_plans import stats_of
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.bench.planner import (
    EPLB_EXTRA,
    PLAIN,
    RNQ,
    SHIPPED_LOADS,
    balance_table,
    compare_policies,
    policy_table,
    to_markdown,
    zipf_loads,
)
from rnq_ep.bench.planner_pairs import all_pairs_table, mean_ratio_interval, target_verdict
from rnq_ep.bench.planner_speed import FORMAT_SETS, speed_table
from rnq_ep.cli import main
from rnq_ep.specs import PlanOptions, load_cluster, load_model


def test_zipf_loads_have_max_over_mean_between_5_and_10():
    model = load_model("deepseek-v3")
    loads = zipf_loads(model, 6, np.random.default_rng(0), tokens=1_000_000)
    counts = np.asarray(loads.counts)
    ratio = counts.max(axis=1) / counts.mean(axis=1)
    assert counts.shape == (6, 256) and ((ratio > 4.5) & (ratio < 10.5)).all()


def test_zipf_loads_are_reproducible_from_the_seed():
    model = load_model("tiny")
    one = zipf_loads(model, 2, np.random.default_rng(3), tokens=1000)
    two = zipf_loads(model, 2, np.random.default_rng(3), tokens=1000)
    assert one.counts == two.counts


def test_a_baseline_that_cannot_plan_becomes_an_infeasible_row():
    model, cluster = load_model("tiny"), load_cluster("h100x32")  # 8 experts on 32 GPUs: no plain EP
    loads = stats_of(model, [[50, 10, 10, 10, 5, 5, 5, 5]])
    results = compare_policies(model, cluster, loads, PlanOptions())
    assert [r.name for r in results if r.score is None] == [PLAIN]
    table = policy_table(results, budget=10**6, title="t")
    assert table.rows[0][1] == "infeasible (below)" and "at least one expert per GPU" in table.note


def test_balance_table_scores_rnq_against_the_eplb_baseline_of_the_same_run():
    pair = ("olmoe-1b-7b", SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json",
            SHIPPED_LOADS / "olmoe-1b-7b-0924_olmoe-repo_github.json")
    table = balance_table(load_cluster("h100x8"), PlanOptions(), [pair])
    row = dict(zip(table.header, table.rows[0]))
    assert row["planned on -> scored on"] == "arxiv -> github"
    ratio = float(row[RNQ]) / float(row[EPLB_EXTRA])
    assert abs(float(row["R&Q / EPLB +12.5 %"]) - ratio) < 2e-3


def test_markdown_fragment_has_command_machine_and_every_row():
    table = policy_table([], budget=1, title="empty", note="a\nb")
    text = to_markdown([table], "rnq-ep bench planner", "cpu", "today")
    assert text.startswith("Command: `rnq-ep bench planner`")
    assert "**empty**" in text and "_a_" in text and "_b_" in text


def test_bench_planner_prints_ratios_and_writes_markdown(tmp_path, capsys):
    md = tmp_path / "bench.md"
    args = ["bench", "planner", "--gpus", "8,16", "--layers", "2", "--no-real", "--markdown", str(md)]
    assert main(args) == 0
    assert "synthetic Zipf" in capsys.readouterr().out
    text = md.read_text()
    assert "| GPUs |" in text and "R&Q / EPLB time" in text
    assert f"Command: `rnq-ep bench planner --gpus 8,16 --layers 2 --no-real --markdown {md}`" in text


def test_speed_table_has_a_row_per_format_set_and_says_when_no_replica_fits():
    table = speed_table(load_model("tiny"), load_cluster("h100x8"), [8], 2, seed=0, options=PlanOptions())
    rows = [dict(zip(table.header, row)) for row in table.rows]
    assert [row["formats"] for row in rows] == ["+".join(f) for f in FORMAT_SETS]
    assert rows[0]["replicas per layer R&Q (median)"] == "0 (none fit)"  # one bf16 expert per GPU, int8 only
    assert int(rows[1]["replicas per layer R&Q (median)"]) > 0  # int4 makes room
    assert "8 GPUs with bf16+int8" in table.note


def test_all_pairs_table_counts_every_ordered_pair_of_a_group(tmp_path):
    for corpus in ("arxiv", "github", "wikipedia"):
        name = f"olmoe-1b-7b-0924_olmoe-repo_{corpus}.json"
        (tmp_path / name).write_bytes((SHIPPED_LOADS / name).read_bytes())
    table = all_pairs_table(load_cluster("h100x8"), PlanOptions(), tmp_path)
    (row,) = table.rows
    assert row[:3] == ("olmoe-1b-7b-0924_olmoe-repo_*", "olmoe-1b-7b", "6")
    files = sorted(tmp_path.glob("*.json"))
    per_pair = balance_table(load_cluster("h100x8"), PlanOptions(), [("olmoe-1b-7b", a, b) for a in files for b in files if a != b])
    ratios = [float(r[per_pair.header.index("R&Q / EPLB +12.5 %")]) for r in per_pair.rows]  # the per-pair table's path
    assert row[3] == f"{sum(r <= 1 for r in ratios)} / 6" and abs(float(row[6]) - max(ratios)) < 1e-3
    interval, verdict = row[-2:]
    average, low, high = (float(x) for x in interval.replace("[", "").replace("]", "").replace(",", "").split())
    assert low <= high and verdict in ("met", "not met")
    if abs(high - 1.0) > 1e-3:  # printed to 3 decimals: only a clear side of 1 decides the check
        assert verdict == target_verdict(high)


def _resampled_means(ratio, pairs, draws, seed):
    """Dumb reference: the same draws of files; each resample takes pair (a, b) once for every draw of a
    paired with every draw of b, and skips a resample that takes no pair."""
    files = sorted(set(pairs.ravel().tolist()))
    picks = np.random.default_rng(seed).integers(0, len(files), (draws, len(files)))
    means = []
    for pick in picks:
        drawn = [files[f] for f in pick]
        taken = [r for r, (a, b) in zip(ratio, pairs.tolist()) for x in drawn for y in drawn if (x, y) == (a, b)]
        if taken:
            means.append(sum(taken) / len(taken))
    return means


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 5), st.integers(0, 2**31), st.data())
def test_mean_ratio_interval_matches_a_loop_and_stays_within_the_ratios(num_files, seed, data):
    pairs = np.array(list(itertools.permutations(range(num_files), 2)))
    ratio = np.array(data.draw(st.lists(st.floats(0.5, 2.0), min_size=len(pairs), max_size=len(pairs))))
    average, low, high = mean_ratio_interval(ratio, pairs, draws=200, seed=seed)
    reference = np.percentile(_resampled_means(ratio, pairs, 200, seed), [2.5, 97.5])
    assert np.allclose((low, high), reference) and average == ratio.mean()
    assert ratio.min() - 1e-12 <= low <= high <= ratio.max() + 1e-12


def test_mean_ratio_interval_of_equal_ratios_is_that_ratio_and_the_verdict_reads_its_upper_end():
    pairs = np.array(list(itertools.permutations(range(4), 2)))
    assert mean_ratio_interval(np.ones(12), pairs) == (1.0, 1.0, 1.0)
    assert target_verdict(1.0) == "met" and target_verdict(1.001) == "not met"
    worse_with_one_file = np.where(pairs[:, 0] == 0, 1.2, 0.9)  # one planning file's plans lose
    average, _, high = mean_ratio_interval(worse_with_one_file, pairs)
    assert average < 1 < high and target_verdict(high) == "not met", "the upper end decides, not the mean"


def test_all_pairs_table_is_none_without_two_files_of_a_group(tmp_path):
    name = "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"
    (tmp_path / name).write_bytes((SHIPPED_LOADS / name).read_bytes())
    assert all_pairs_table(load_cluster("h100x8"), PlanOptions(), tmp_path) is None
