"""Torch oracles for the grouped kernels: obvious loops in fp32."""

from __future__ import annotations

import torch


def grouped_swiglu_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 [N, H]: rows offsets[g]:offsets[g+1] of x [N, H] through expert g's SwiGLU (w_gate_up [G, 2I, H], w_down [G, H, I])."""
    inter = w_down.shape[-1]
    out = torch.zeros(x.shape[0], w_down.shape[1], dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for g in range(w_gate_up.shape[0]):
        rows = x[bounds[g] : bounds[g + 1]].to(torch.float32)  # [n_g, H]
        gate_up = rows @ w_gate_up[g].to(torch.float32).T  # [n_g, 2I]
        hidden = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n_g, I]
        out[bounds[g] : bounds[g + 1]] = hidden @ w_down[g].to(torch.float32).T
    if row_weight is not None:
        out = out * row_weight.to(torch.float32)[:, None]
    return out


def block_map_reference(offsets: torch.Tensor, block_m: int, max_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_group [max_blocks], block_row [max_blocks]) int32 by a python loop; unused blocks are (-1, 0)."""
    block_group = torch.full((max_blocks,), -1, dtype=torch.int32)
    block_row = torch.zeros(max_blocks, dtype=torch.int32)
    bounds = offsets.tolist()
    block = 0
    for g in range(len(bounds) - 1):
        for row in range(bounds[g], bounds[g + 1], block_m):
            block_group[block], block_row[block] = g, row
            block += 1
    return block_group, block_row
