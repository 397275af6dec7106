"""`rnq-ep bench step`: rows for every path and token count; the exact step reads the device once, capacity never."""

import json

import pytest

from rnq_ep.bench import step


def test_bench_step_writes_a_row_per_path_and_token_count(tmp_path, capsys):
    out = tmp_path / "step.json"
    assert step.main(["--tokens", "1,16", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens_per_rank"], r["path"]) for r in rows] == [
        (t, p) for t in (1, 16) for p in ("old", "exact", "capacity")]
    for row in rows:
        assert set(row) >= {"tokens_per_rank", "path", "host_us_per_layer", "syncs_per_layer", "aten_ops_per_layer"}
        assert row["host_us_per_layer"] > 0 and row["aten_ops_per_layer"] > 0
    syncs = {r["path"]: r["syncs_per_layer"] for r in rows if r["tokens_per_rank"] == 16}
    assert syncs["exact"] == 1 and syncs["capacity"] == 0 and syncs["old"] >= 1
    assert "old / this" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--tokens", "0"], "--tokens"), (["--tokens", "a"], "--tokens"),
                                           (["--repeats", "0"], "--repeats")])
def test_bench_step_refuses_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        step.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
