"""Expert time with one core per rank on a host with fewer cores: ranks run their local experts in turns.

When N gloo ranks share fewer than N cores, a rank's expert CPU time depends on how many other ranks
compute at the same moment (time slicing refills its caches, the ranks share memory bandwidth), and a
balanced layer has every rank computing at once while plain EP's heavy rank finishes alone. So the
bench reruns each step with the experts of one rank at a time (the others wait in a barrier, which
sleeps) and times each rank's call, the fastest of a few tries, as load from other processes only adds.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from rnq_ep.experts import LocalExperts
from rnq_ep.layer import EPMoE
from rnq_ep.runtime.inputs import Routing
from rnq_ep.runtime.worker import run_step

TRIES = 3  # timed runs of a rank's experts per turn; the fastest counts


class ExpertsInTurns:
    """Stands in for a layer's LocalExperts: rank r computes during turn r of `num_ranks`, timed alone."""

    def __init__(self, experts: LocalExperts, rank: int, num_ranks: int, group: dist.ProcessGroup | None) -> None:
        """Wrap `experts` of `rank` of `num_ranks` in `group`."""
        self.experts, self.rank, self.num_ranks, self.group = experts, rank, num_ranks, group
        self.seconds = 0.0  # CPU time of this rank's last call, fastest of TRIES

    def __call__(self, recv: torch.Tensor, local_offsets: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
        """LocalExperts' call: recv [N, H] sorted by local copy -> router-weighted outputs [N, H]."""
        for turn in range(self.num_ranks):
            dist.barrier(self.group)
            if turn == self.rank:
                times = []
                for _ in range(TRIES):
                    start = time.thread_time()
                    out = self.experts(recv, local_offsets, row_weight)
                    times.append(time.thread_time() - start)
                self.seconds = min(times)
        dist.barrier(self.group)
        return out


def expert_seconds_alone(
    layers: list[EPMoE], hidden: torch.Tensor, routing: Routing, rank: int, num_ranks: int,
    group: dist.ProcessGroup | None,
) -> list[float]:
    """Rerun a step (hidden [T, H], routing per layer) with experts in turns: this rank's expert CPU time per layer."""
    turns = [ExpertsInTurns(layer.experts, rank, num_ranks, group) for layer in layers]
    for layer, stand_in in zip(layers, turns):
        layer.experts = stand_in
    try:
        run_step(-1, layers, hidden, routing, group, keep_outputs=False)
    finally:
        for layer, stand_in in zip(layers, turns):
            layer.experts = stand_in.experts
    return [stand_in.seconds for stand_in in turns]
