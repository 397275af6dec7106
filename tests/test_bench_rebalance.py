"""bench rebalance, cost-model part: one row per GPU count; staging one layer per step stalls less than stop-the-world."""

from rnq_ep.bench.rebalance import cost_model_table


def test_cost_model_rows_show_staged_below_stop_the_world():
    table = cost_model_table([64], layers=1, tokens_per_gpu=4096, seed=0)
    assert [row[0] for row in table.rows] == ["64"]
    staged, world = float(table.rows[0][4]), float(table.rows[0][6])
    assert 1.0 <= staged <= world
