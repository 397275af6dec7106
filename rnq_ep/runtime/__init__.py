"""Start workers and run steps: `run_worker` is the one entry torchrun and Ray actors both call."""

from rnq_ep.runtime.options import RunOptions
from rnq_ep.runtime.worker import StepStats, run_worker

__all__ = ["RunOptions", "StepStats", "run_worker"]
