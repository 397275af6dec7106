"""bench.planner: policy comparison helpers, synthetic Zipf loads, real-load balance table."""

import numpy as np
from handmade_plans import stats_of

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
from rnq_ep.bench.planner_pairs import all_pairs_table
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


def test_all_pairs_table_is_none_without_two_files_of_a_group(tmp_path):
    name = "olmoe-1b-7b-0924_olmoe-repo_arxiv.json"
    (tmp_path / name).write_bytes((SHIPPED_LOADS / name).read_bytes())
    assert all_pairs_table(load_cluster("h100x8"), PlanOptions(), tmp_path) is None
