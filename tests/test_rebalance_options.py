"""The rebalancing flags parse into exactly the fields of run_worker's RunOptions."""

import argparse

import msgspec

from rnq_ep.rebalance.options import add_rebalance_arguments, rebalance_flags_given, rebalance_kwargs
from rnq_ep.runtime.options import RunOptions


def test_flags_map_onto_run_options_fields():
    parser = argparse.ArgumentParser()
    add_rebalance_arguments(parser)
    kwargs = rebalance_kwargs(parser.parse_args(["--rebalance-interval", "8", "--loads-after", "b.json", "--drift-step", "3"]))
    assert set(kwargs) <= {field.name for field in msgspec.structs.fields(RunOptions)}
    assert kwargs["rebalance_interval"] == 8 and kwargs["loads_after"] == "b.json" and kwargs["drift_step"] == 3


def test_only_flags_set_away_from_their_defaults_are_reported():
    parser = argparse.ArgumentParser()
    add_rebalance_arguments(parser)
    assert rebalance_flags_given(parser.parse_args([])) == []
    given = rebalance_flags_given(parser.parse_args(["--rebalance-interval", "4", "--drift-step", "2"]))
    assert given == ["--rebalance-interval", "--drift-step"]
