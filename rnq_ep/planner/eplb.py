"""DeepSeek EPLB semantics in numpy: greedy replication + balanced packing, hierarchical by node.

Same contract and tie-breaking as deepseek-ai/EPLB `rebalance_experts` (stable descending sort,
first index wins among equal loads), so its published example is reproduced exactly. Unlike the
R&Q planner this does not stop two copies of one expert from landing on one GPU; `plan_eplb`
repairs that afterwards.
"""

from __future__ import annotations

import heapq

import numpy as np


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack items [X, n] into `num_packs` packs of n/num_packs items each -> (pack [X, n], rank_in_pack [X, n])."""
    num_rows, num_items = weight.shape
    if num_items % num_packs:
        raise ValueError(f"balanced_packing: {num_items} items do not split evenly into {num_packs} packs")
    per_pack = num_items // num_packs
    if per_pack == 1:
        pack = np.broadcast_to(np.arange(num_items, dtype=np.int64), weight.shape).copy()
        return pack, np.zeros_like(pack)
    order = np.argsort(-weight, axis=1, kind="stable")  # heaviest first, ties by index
    pack = np.full(weight.shape, -1, dtype=np.int64)
    rank = np.full(weight.shape, -1, dtype=np.int64)
    for row in range(num_rows):
        # heap of (pack weight, pack id): the lightest non-full pack, lowest id among ties
        heap = [(0.0, p) for p in range(num_packs)]
        filled = [0] * num_packs
        row_weight = weight[row]
        for item in order[row]:
            load, p = heapq.heappop(heap)
            pack[row, item] = p
            rank[row, item] = filled[p]
            filled[p] += 1
            if filled[p] < per_pack:
                heapq.heappush(heap, (load + float(row_weight[item]), p))
    return pack, rank


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Add copies to the expert with the largest load per copy -> (phy2log [X, P], replica rank [X, P], logcnt [X, n])."""
    num_rows, num_logical = weight.shape
    if num_physical < num_logical:
        raise ValueError(f"replicate_experts: {num_physical} physical slots < {num_logical} experts")
    phy2log = np.tile(np.arange(num_physical, dtype=np.int64), (num_rows, 1))
    rank = np.zeros((num_rows, num_physical), dtype=np.int64)
    logcnt = np.ones((num_rows, num_logical), dtype=np.int64)
    rows = np.arange(num_rows)
    for slot in range(num_logical, num_physical):
        best = np.argmax(weight / logcnt, axis=1)
        phy2log[:, slot] = best
        rank[:, slot] = logcnt[rows, best]
        logcnt[rows, best] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations [X, n]."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _rebalance_hierarchical(
    weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups -> nodes, replicate within each node, copies -> GPUs of the node -> (phy2log, rank, logcnt)."""
    num_layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    per_gpu = num_physical // num_gpus
    logical_per_node = num_logical // num_nodes

    group_tokens = weight.reshape(num_layers, num_groups, group_size).sum(-1)  # [L, groups]
    group_pack, group_rank = balanced_packing(group_tokens, num_nodes)
    # logical expert -> "node-major" logical index
    log2mlog = ((group_pack * groups_per_node + group_rank) * group_size)[:, :, None] + np.arange(group_size)
    log2mlog = log2mlog.reshape(num_layers, num_logical)
    mlog2log = _inverse(log2mlog)

    mlog_tokens = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, logical_per_node)  # [L*nodes, n/nodes]
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_tokens, num_physical // num_nodes)

    phy_tokens = np.take_along_axis(mlog_tokens / mlogcnt, phy2mlog, axis=1)
    pack, rank_in_pack = balanced_packing(phy_tokens, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * per_gpu + rank_in_pack)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(num_layers, num_nodes, -1)
    pphy2mlog = (pphy2mlog + np.arange(0, num_logical, logical_per_node)[None, :, None]).reshape(num_layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB: loads [L, E] -> (phy2log [L, P], log2phy [L, E, maxcopies] -1 padded, logcnt [L, E])."""
    weight = np.asarray(weight, dtype=np.float64)
    num_layers, num_logical = weight.shape
    if num_replicas % num_gpus:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} is not a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"rebalance_experts: num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}")
    if num_replicas < num_logical:
        raise ValueError(f"rebalance_experts: num_replicas={num_replicas} < {num_logical} experts")
    hierarchical = num_groups % num_nodes == 0 and num_logical % num_groups == 0
    if hierarchical:
        phy2log, phyrank, logcnt = _rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phyrank, logcnt = _rebalance_hierarchical(weight, num_replicas, 1, 1, num_gpus)
    max_copies = int(logcnt.max())
    log2phy = np.full((num_layers, num_logical * max_copies), -1, dtype=np.int64)
    np.put_along_axis(
        log2phy,
        phy2log * max_copies + phyrank,
        np.broadcast_to(np.arange(num_replicas, dtype=np.int64), phy2log.shape),
        axis=1,
    )
    return phy2log, log2phy.reshape(num_layers, num_logical, max_copies), logcnt
