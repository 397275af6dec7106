"""Placement planners: R&Q (replicate + quantize), plain EP and an EPLB-equivalent; plan arrays and exports."""

from rnq_ep.planner.arrays import plan_arrays
from rnq_ep.planner.baselines import plan_eplb, plan_plain_ep
from rnq_ep.planner.eplb import rebalance_experts
from rnq_ep.planner.export import EXPORTS, export_losses, export_sglang, export_vllm
from rnq_ep.planner.layout import InfeasiblePlan
from rnq_ep.planner.rnq import plan_rnq

__all__ = [
    "EXPORTS",
    "InfeasiblePlan",
    "export_losses",
    "export_sglang",
    "export_vllm",
    "plan_arrays",
    "plan_eplb",
    "plan_plain_ep",
    "plan_rnq",
    "rebalance_experts",
]
