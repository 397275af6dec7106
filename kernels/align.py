"""Block-to-group map for grouped GEMMs (the moe_align_block_size idea), built on device.

Rows of x are sorted by group (expert copy); group g owns rows offsets[g]:offsets[g+1] and
cdiv(rows_g, block_m) row blocks. Block b of the launch grid computes rows
block_row[b] : min(block_row[b] + block_m, offsets[g + 1]) of group block_group[b]. The grid
is sized by the host-known bound N // block_m + G, so nothing waits on the device; blocks past
the real count get group -1 and exit at once. One small Triton launch builds the map (a chain
of torch ops would be ~20 tiny launches, comparable to a whole decode step's GEMMs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCKS_PER_PROGRAM = 32


def max_blocks(num_rows: int, num_groups: int, block_m: int) -> int:
    """Upper bound on sum_g cdiv(rows_g, block_m) over any split of num_rows rows into num_groups groups."""
    return num_rows // block_m + num_groups


@triton.jit
def _block_map_kernel(
    offsets_ptr, block_group_ptr, block_row_ptr, num_groups, num_blocks,
    BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, BLOCKS: tl.constexpr,
):
    """block_group/block_row for BLOCKS consecutive blocks; GROUPS >= num_groups (power of two)."""
    block = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    g = tl.arange(0, GROUPS)
    first = tl.load(offsets_ptr + g, mask=g < num_groups, other=0)
    last = tl.load(offsets_ptr + g + 1, mask=g < num_groups, other=0)
    blocks = (last - first + BLOCK_M - 1) // BLOCK_M  # [GROUPS], 0 for padding groups
    end = tl.cumsum(blocks, 0)  # [GROUPS], exclusive end of each group's blocks
    before = end[None, :] <= block[:, None]  # [BLOCKS, GROUPS]: group ends before this block
    group = tl.sum(before.to(tl.int32), axis=1)  # empty groups are skipped; >= num_groups: unused
    group_start = tl.sum(tl.where(before, blocks[None, :], 0), axis=1)  # first block of `group`
    valid = group < num_groups
    row = tl.load(offsets_ptr + group, mask=valid, other=0) + (block - group_start) * BLOCK_M
    in_grid = block < num_blocks
    tl.store(block_group_ptr + block, tl.where(valid, group, -1), mask=in_grid)
    tl.store(block_row_ptr + block, tl.where(valid, row, 0), mask=in_grid)


def block_map(offsets: torch.Tensor, block_m: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_group [num_blocks], block_row [num_blocks]) int32 on offsets.device from offsets [G+1] int32; no host sync."""
    block_group = torch.empty(num_blocks, dtype=torch.int32, device=offsets.device)
    block_row = torch.empty_like(block_group)
    num_groups = offsets.numel() - 1
    grid = (triton.cdiv(num_blocks, _BLOCKS_PER_PROGRAM),)
    _block_map_kernel[grid](
        offsets, block_group, block_row, num_groups, num_blocks,
        BLOCK_M=block_m, GROUPS=triton.next_power_of_2(num_groups), BLOCKS=_BLOCKS_PER_PROGRAM,
    )
    return block_group, block_row
