"""The rebalancing flags parse into exactly the keywords run_worker takes."""

import argparse
import inspect

from rnq_ep.rebalance.options import add_rebalance_arguments, rebalance_flags_given, rebalance_kwargs
from rnq_ep.runtime.worker import run_worker


def test_flags_map_onto_run_worker_keywords():
    parser = argparse.ArgumentParser()
    add_rebalance_arguments(parser)
    kwargs = rebalance_kwargs(parser.parse_args(["--rebalance-interval", "8", "--loads-after", "b.json", "--drift-step", "3"]))
    assert set(kwargs) <= set(inspect.signature(run_worker).parameters)
    assert kwargs["rebalance_interval"] == 8 and kwargs["loads_after"] == "b.json" and kwargs["drift_step"] == 3


def test_only_flags_set_away_from_their_defaults_are_reported():
    parser = argparse.ArgumentParser()
    add_rebalance_arguments(parser)
    assert rebalance_flags_given(parser.parse_args([])) == []
    given = rebalance_flags_given(parser.parse_args(["--rebalance-interval", "4", "--drift-step", "2"]))
    assert given == ["--rebalance-interval", "--drift-step"]
