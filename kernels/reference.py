"""Torch oracles for the grouped kernels: obvious loops in fp32.

The reference also computes what the Triton kernels do not (yet): biases and GPT-OSS's clamped
SwiGLU ("swiglu-oai"), so the torch expert backend can run those models.
"""

from __future__ import annotations

import torch

ACTIVATIONS = ("silu", "swiglu-oai")
SWIGLU_OAI_ALPHA = 1.702  # GPT-OSS: glu = gate * sigmoid(alpha * gate)
SWIGLU_OAI_LIMIT = 7.0  # GPT-OSS: gate clamped above, up clamped to [-limit, limit]


def check_activation(activation: str) -> None:
    """Raise ValueError unless `activation` is one of ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}, expected one of {ACTIVATIONS}")


def gated(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """[n, 2I] (first I columns gate, next I up) -> [n, I]: silu(gate) * up, or GPT-OSS's (up + 1) * gate * sigmoid(1.702 gate) clamped."""
    check_activation(activation)
    inter = gate_up.shape[-1] // 2
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    if activation == "silu":
        return torch.nn.functional.silu(gate) * up
    gate, up = gate.clamp(max=SWIGLU_OAI_LIMIT), up.clamp(-SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * SWIGLU_OAI_ALPHA))  # GPT-OSS's order of operations


def grouped_swiglu_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    activation: str = "silu",
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 [N, H]: rows offsets[g]:offsets[g+1] of x [N, H] through expert g's SwiGLU (w_gate_up [G, 2I, H], w_down [G, H, I]).

    Optional biases gate_up_bias [G, 2I] and down_bias [G, H] are added before the activation and
    before row_weight; `activation` is one of ACTIVATIONS (see `gated`).
    """
    check_activation(activation)
    out = torch.zeros(x.shape[0], w_down.shape[1], dtype=torch.float32, device=x.device)
    bounds = offsets.tolist()
    for g in range(w_gate_up.shape[0]):
        rows = x[bounds[g] : bounds[g + 1]].to(torch.float32)  # [n_g, H]
        gate_up = rows @ w_gate_up[g].to(torch.float32).T  # [n_g, 2I]
        if gate_up_bias is not None:
            gate_up = gate_up + gate_up_bias[g].to(torch.float32)
        down = gated(gate_up, activation) @ w_down[g].to(torch.float32).T  # [n_g, H]
        if down_bias is not None:
            down = down + down_bias[g].to(torch.float32)
        out[bounds[g] : bounds[g + 1]] = down
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


@torch.library.custom_op("rnq_ep::grouped_swiglu_reference", mutates_args=())
def grouped_swiglu_op(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    row_weight: torch.Tensor | None,
    activation: str,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
) -> torch.Tensor:
    """grouped_swiglu_reference as one opaque op (fp32 [N, H]), so the CPU expert path keeps a compiled graph whole."""
    return grouped_swiglu_reference(x, w_gate_up, w_down, offsets, row_weight, activation, gate_up_bias, down_bias)


@grouped_swiglu_op.register_fake
def _grouped_swiglu_op_fake(x, w_gate_up, w_down, offsets, row_weight, activation, gate_up_bias, down_bias):
    return x.new_empty(x.shape[0], w_down.shape[1], dtype=torch.float32)
