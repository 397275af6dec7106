"""Block-to-group map for grouped GEMMs (the moe_align_block_size idea), built on device.

Rows of x are sorted by group (expert copy); group g owns rows offsets[g]:offsets[g+1] and
cdiv(rows_g, block_m) row blocks. Block b of the launch grid computes rows
block_row[b] : min(block_row[b] + block_m, offsets[g + 1]) of group block_group[b]. The grid
is sized by the host-known bound N // block_m + G, so nothing waits on the device; blocks past
the real count get group -1 and exit at once.
"""

from __future__ import annotations

import torch


def max_blocks(num_rows: int, num_groups: int, block_m: int) -> int:
    """Upper bound on sum_g cdiv(rows_g, block_m) over any split of num_rows rows into num_groups groups."""
    return num_rows // block_m + num_groups


def block_map(offsets: torch.Tensor, block_m: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_group [num_blocks], block_row [num_blocks]) int32 on offsets.device from offsets [G+1]; no host sync."""
    num_groups = offsets.numel() - 1
    offsets = offsets.to(torch.int64)
    blocks = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m  # [G]
    block_end = torch.cumsum(blocks, 0)  # [G], exclusive end of each group's blocks
    block_ids = torch.arange(num_blocks, device=offsets.device)  # [B]
    group = torch.searchsorted(block_end, block_ids, right=True)  # [B] in [0, G]; G = unused
    valid = group < num_groups
    group = group.clamp(max=num_groups - 1)
    row = offsets[group] + (block_ids - (block_end - blocks)[group]) * block_m  # [B]
    block_group = torch.where(valid, group, -1).to(torch.int32)
    block_row = torch.where(valid, row, 0).to(torch.int32)
    return block_group, block_row
