"""Terminal tables fit 120 columns; --wide prints every column."""

from __future__ import annotations

from pathlib import Path

from rnq_ep.bench.planner import BenchTable
from rnq_ep.cli import main
from rnq_ep.report import TABLE_COLUMNS, WIDE_ENV, fitting_columns, print_table

ARXIV = str(Path(__file__).resolve().parent.parent / "configs" / "loads" / "olmoe-1b-7b-0924_olmoe-repo_arxiv.json")
TABLE = BenchTable("t", ("name", "first value", "second value"), [("a" * 30, "x" * 50, "y" * 50)], note="a note")


def test_fitting_columns_keep_the_first_columns_that_fit_with_their_borders():
    assert fitting_columns(TABLE, 1 + 33 + 53) == [0, 1]
    assert fitting_columns(TABLE, 1 + 33 + 53 + 53) == [0, 1, 2]
    assert fitting_columns(TABLE, 10) == [0], "the first column always shows"


def test_a_table_without_wide_names_the_columns_it_leaves_out(capsys, monkeypatch):
    monkeypatch.setenv(WIDE_ENV, "0")
    print_table(TABLE)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "t" and max(map(len, lines)) <= TABLE_COLUMNS and not any("yyy" in line for line in lines)
    assert "not shown (--wide shows them): second value" in "\n".join(lines)


def test_plan_with_wide_prints_every_column_and_without_it_fits_120(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(WIDE_ENV, "0")
    argv = ["plan", "--model", "olmoe-1b-7b", "--cluster", "h100x8", "--loads", ARXIV, "--out", str(tmp_path / "p.json")]
    assert main(argv) == 0
    narrow = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in narrow[1:]) <= TABLE_COLUMNS and "planner" in narrow[-2], "all but the title line"
    assert main([*argv, "--wide"]) == 0
    assert any(len(line) > TABLE_COLUMNS and "planner" in line for line in capsys.readouterr().out.splitlines()[1:])
