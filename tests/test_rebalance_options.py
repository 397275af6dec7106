"""The rebalancing flags parse into exactly the keywords run_worker takes."""

import argparse
import inspect

from rnq_ep.rebalance.options import add_rebalance_arguments, rebalance_kwargs
from rnq_ep.runtime.worker import run_worker


def test_flags_map_onto_run_worker_keywords():
    parser = argparse.ArgumentParser()
    add_rebalance_arguments(parser)
    kwargs = rebalance_kwargs(parser.parse_args(["--rebalance-interval", "8", "--loads-after", "b.json", "--drift-step", "3"]))
    assert set(kwargs) <= set(inspect.signature(run_worker).parameters)
    assert kwargs["rebalance_interval"] == 8 and kwargs["loads_after"] == "b.json" and kwargs["drift_step"] == 3
