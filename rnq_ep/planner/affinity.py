"""Optional affinity (ExFlow-style): line up co-activated experts of consecutive layers on one GPU.

GPUs are interchangeable within a layer (same budget), so renaming a layer's GPUs changes
neither its balance nor its bytes; we rename each layer's GPUs to keep the most co-activated
tokens on the GPU they are already on. Tokens of expert e in layer l move on to expert e' in
layer l+1 `coactivation[l][e][e']` times; with copies splitting tokens by their shares, GPU g of
layer l and GPU h of layer l+1 share A[g, h] = (P_l C_l P_{l+1}^T)[g, h] tokens, P[g, e] being
the share of e on g. A greedy assignment (columns by their best value) followed by pairwise
swaps while one helps (at most 2G swaps) picks the renaming.
"""

from __future__ import annotations

import numpy as np


def share_matrix(gpu: np.ndarray, expert: np.ndarray, share: np.ndarray, num_gpus: int, num_experts: int) -> np.ndarray:
    """P [G, E]: share of expert e's tokens served on GPU g, from slots [S]."""
    matrix = np.zeros((num_gpus, num_experts))
    np.add.at(matrix, (gpu, expert), share)
    return matrix


def align_to_previous(previous: np.ndarray, current: np.ndarray, coactivation: np.ndarray) -> np.ndarray:
    """GPU renaming [G] (old -> new) of the current layer that keeps co-activated tokens in place.

    previous, current: P matrices [G, E] of layers l and l+1; coactivation [E, E] l -> l+1.
    """
    shared = previous @ coactivation @ current.T  # [G_prev, G_cur] tokens staying put
    num_gpus = shared.shape[0]
    rename = np.full(num_gpus, -1, dtype=np.int64)
    free_prev = np.ones(num_gpus, dtype=bool)
    for cur in np.argsort(-shared.max(axis=0), kind="stable"):
        best = int(np.argmax(np.where(free_prev, shared[:, cur], -np.inf)))
        rename[cur] = best
        free_prev[best] = False
    columns = np.arange(num_gpus)
    for _ in range(2 * num_gpus):
        kept = shared[rename, columns]  # [G] tokens kept by each current GPU
        # gain[i, j]: swap the names of current GPUs i and j
        gain = shared[rename[None, :], columns[:, None]] + shared[rename[:, None], columns[None, :]]
        gain -= kept[:, None] + kept[None, :]
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[i, j] <= 1e-12 * max(kept.sum(), 1.0):
            break
        rename[i], rename[j] = rename[j], rename[i]
    return rename
