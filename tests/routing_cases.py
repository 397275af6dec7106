"""Random layers and top-k draws shared by the routing and dispatch tests."""

from __future__ import annotations

import numpy as np
import torch

from rnq_ep.balance import SlotTable


def random_table(rng: np.random.Generator, num_gpus: int, num_experts: int, random_shares: bool) -> SlotTable:
    """Every expert gets 1..G copies on distinct GPUs, random formats; shares random or even."""
    gpu, expert = [], []
    for e in range(num_experts):
        for g in rng.choice(num_gpus, rng.integers(1, num_gpus + 1), replace=False):
            gpu.append(g)
            expert.append(e)
    expert_arr = np.array(expert)
    share = rng.random(len(expert)) + 0.01 if random_shares else np.ones(len(expert))
    share /= np.bincount(expert_arr, weights=share)[expert_arr]
    fmt = rng.integers(0, 3, len(expert))
    return SlotTable.from_arrays(np.array(gpu), expert_arr, fmt, share, num_gpus, num_experts)


def draw_topk(rng: np.random.Generator, tokens: int, top_k: int, weight: np.ndarray) -> torch.Tensor:
    """[tokens, top_k] int64, distinct expert ids per token drawn with probability ~ weight."""
    p = weight / weight.sum()
    ids = [rng.choice(len(p), top_k, replace=False, p=p) for _ in range(tokens)]
    return torch.tensor(np.array(ids, dtype=np.int64).reshape(tokens, top_k))
