"""What one layer's plan must respect, with cached Python views for the per-step code of the spread."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from rnq_ep.planner.quantize import format_moves


@dataclass(frozen=True)
class Limits:
    """What one layer's plan must respect."""

    budget: int  # bytes per GPU
    fmt_bytes: np.ndarray  # [3] bytes of one expert per format
    cost: np.ndarray  # [E, 3] quality cost per token, inf where the format is not allowed
    token_budget: float  # most tokens that quantized copies may serve
    max_copies: int
    max_held: int  # most copies one GPU can hold, all in the smallest allowed format
    gpus_per_node: int
    prefer_node: bool  # keep an expert's copies on its node when that node has room

    def with_token_budget(self, token_budget: float) -> Limits:
        """The same limits with another quality budget, sharing the cached Python views below (made here
        when missing, so that every copy of these limits shares them)."""
        other = replace(self, token_budget=token_budget)
        shared = ("allowed_codes", "common_codes", "cost_rows", "moves", "sizes", "smallest_common")
        other.__dict__.update({key: getattr(self, key) for key in shared})
        return other

    @cached_property
    def common_codes(self) -> list[int]:
        """Format codes that every expert may use, ascending (bf16 = 0 first)."""
        return np.flatnonzero(np.isfinite(self.cost).all(axis=0)).tolist()

    @cached_property
    def smallest_common(self) -> int:
        """Bytes of the smallest format that every expert may use."""
        return int(self.fmt_bytes[self.common_codes].min())

    @cached_property
    def allowed_codes(self) -> list[int]:
        """Format codes that some expert may use."""
        return np.flatnonzero(np.isfinite(self.cost).any(axis=0)).tolist()

    @cached_property
    def cost_rows(self) -> list[list[float]]:
        """`cost` as Python lists [E][3], for the per-step code that works on a few copies."""
        return self.cost.tolist()

    @cached_property
    def moves(self) -> list[list[list[tuple[int, float, int, int]]]]:
        """`quantize.format_moves` of each expert [E][3], for the per-step code that frees room on a GPU."""
        of_row: dict[tuple[float, ...], list] = {}  # experts with equal costs share their moves
        for row in self.cost_rows:
            if tuple(row) not in of_row:
                of_row[tuple(row)] = format_moves(row, self.sizes)
        return [of_row[tuple(row)] for row in self.cost_rows]

    @cached_property
    def sizes(self) -> list[int]:
        """`fmt_bytes` as a Python list [3]."""
        return self.fmt_bytes.tolist()
