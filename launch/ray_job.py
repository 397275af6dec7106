"""Entry for Ray job submission: the plan runs on the cluster the job was submitted to.

    ray job submit --working-dir . -- python launch/ray_job.py --plan plan.json --loads loads.json

`ray job submit` sets RAY_ADDRESS for the entrypoint, so the driver joins that cluster; run by
hand without it, the job starts a local cluster. Options are those of `rnq-ep run --ray`.
"""

from __future__ import annotations

import argparse
import sys

from rnq_ep.runtime.ray_cli import add_ray_arguments, ray_main
from rnq_ep.runtime.torchrun import add_run_arguments


def main(argv: list[str] | None = None) -> int:
    """Parse `rnq-ep run --ray` options and run the job on Ray."""
    parser = argparse.ArgumentParser(prog="launch/ray_job.py", description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    add_ray_arguments(parser)
    return ray_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
