"""Sliding window of per-layer routed counts, accumulated on the device; one all_reduce per snapshot."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from rnq_ep.layer import EPMoE


class LoadRecorder:
    """Counts [L, E] of the last `window` steps; layers add into `current` without a host sync."""

    def __init__(self, num_layers: int, num_experts: int, window: int, device: torch.device | str = "cpu") -> None:
        """An empty window of `window` steps of [num_layers, num_experts] counts on `device`."""
        if window < 1:
            raise ValueError(f"recorder window must be >= 1 step, got {window}")
        self.window = window
        self.current = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)  # this step
        self.history = torch.zeros(window, num_layers, num_experts, dtype=torch.int64, device=device)  # ring
        self.steps = 0

    def attach(self, layers: list[EPMoE]) -> None:
        """Make each layer add its routed counts into its row of `current` (views: no copies)."""
        if len(layers) != self.current.shape[0]:
            raise ValueError(f"recorder has {self.current.shape[0]} layers, got {len(layers)}")
        for row, layer in zip(self.current, layers):
            layer.routed_counts = row

    def end_step(self) -> None:
        """Close the step: its counts replace the oldest step of the window (on the device)."""
        self.history[self.steps % self.window].copy_(self.current)
        self.current.zero_()
        self.steps += 1

    @property
    def full(self) -> bool:
        """True once `window` steps have been recorded."""
        return self.steps >= self.window

    def snapshot(self, group: dist.ProcessGroup | None = None) -> np.ndarray:
        """Window counts of all ranks [L, E] int64: one all_reduce (when a process group is up), one copy to host."""
        total = self.history.sum(dim=0)  # [L, E]
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(total, group=group)
        return total.cpu().numpy()
