"""Initial placement: copies of each expert packed by load, an equal number of copies per GPU."""

from __future__ import annotations

import numpy as np


def copy_counts(weight: np.ndarray, extra: int, max_copies: int) -> np.ndarray:
    """Give `extra` more copies, one at a time, to the expert with the largest load per copy -> [E].

    EPLB's replication rule (ties: lowest expert index), with at most `max_copies` per expert.
    Done at once: the j-th extra copy of e is worth w_e / j, and the rule takes the `extra`
    largest of these values.
    """
    counts = np.ones(weight.size, dtype=np.int64)
    depth = min(extra, max_copies - 1)
    total = float(weight.sum())
    if total > 0:
        # every value taken is >= the final max load per copy >= total / (E + extra), so j <= w_max / that
        depth = min(depth, int(weight.max() * (weight.size + extra) / total) + 1)
    if depth <= 0:
        return counts
    value = weight[:, None] / np.arange(1, depth + 1)  # [E, depth]
    if extra >= value.size:
        return counts + depth
    # the `extra` largest values; among values equal to the smallest one taken, lower experts first
    cut = np.partition(value.ravel(), value.size - extra)[value.size - extra]
    above = value > cut
    tied = np.flatnonzero(value.ravel() == cut)[: extra - int(above.sum())]  # row-major: by expert
    return counts + above.sum(axis=1) + np.bincount(tied // depth, minlength=weight.size)


def replica_order(weight: np.ndarray, most: int, max_copies: int) -> np.ndarray:
    """Experts of the first `most` extra copies by EPLB's rule, best first -> [<= most]: for every r <= most,
    `1 + bincount(order[:r])` equals `copy_counts(weight, r, max_copies)`, so R trials share one ranking.

    Taken values are > 0 when any weight is (see copy_counts), so the depth bound of `most` holds for every r.
    """
    depth = min(most, max_copies - 1)
    total = float(weight.sum())
    if total > 0:
        depth = min(depth, int(weight.max() * (weight.size + most) / total) + 1)
    if depth <= 0:
        return np.zeros(0, dtype=np.int64)
    value = (weight[:, None] / np.arange(1, depth + 1)).ravel()  # row-major: by expert, then copy
    chosen = np.arange(value.size)
    if most < value.size:
        cut = np.partition(value, value.size - most)[value.size - most]
        above = np.flatnonzero(value > cut)
        chosen = np.concatenate([above, np.flatnonzero(value == cut)[: most - above.size]])
    return chosen[np.lexsort((chosen, -value[chosen]))] // depth  # ties: lower expert, then lower copy


def pack_by_rounds(expert: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """LPT in rounds: copies (expert [S], load [S]) -> gpu [S], never two copies of an expert on one GPU.

    Round r hands the next G heaviest copies to the GPUs sorted by load so far (lightest first),
    so every GPU ends with floor(S/G) or ceil(S/G) copies. A copy whose GPU already holds its
    expert takes the lightest GPU of the round that does not (copies of an expert <= G).
    """
    return pack_rows_by_rounds(expert[None], load[None], num_gpus)[0]


def pack_rows_by_rounds(expert: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """`pack_by_rounds` of every row of expert [L, S] and load [L, S] at once (numpy over the rows) -> gpu [L, S]."""
    rows = np.arange(expert.shape[0])[:, None]
    order = np.lexsort((expert, -load))  # [L, S]: per row, heaviest first, ties by expert
    gpu_of = np.empty(expert.shape, dtype=np.int64)
    gpu_load = np.zeros((expert.shape[0], num_gpus))
    holds = np.zeros((expert.shape[0], int(expert.max()) + 1, num_gpus), dtype=bool)
    for start in range(0, expert.shape[1], num_gpus):
        batch = order[:, start : start + num_gpus]
        batch_expert = expert[rows, batch]
        by_load = np.argsort(gpu_load, axis=1, kind="stable")
        lightest = by_load[:, : batch.shape[1]].copy()
        for row in np.flatnonzero(holds[rows, batch_expert, lightest].any(axis=1)):
            lightest[row] = _resolve_clashes(batch_expert[row], lightest[row], holds[row], by_load[row])
        gpu_of[rows, batch] = lightest
        gpu_load[rows, lightest] += load[rows, batch]
        holds[rows, batch_expert, lightest] = True
    return gpu_of


def _resolve_clashes(experts: np.ndarray, chosen: np.ndarray, holds: np.ndarray, by_load: np.ndarray) -> np.ndarray:
    """Reassign a round so no copy lands on a GPU holding its expert; heaviest copies pick first."""
    taken: set[int] = set()
    result = chosen.copy()
    for i, e in enumerate(experts.tolist()):
        for g in by_load.tolist():
            if g not in taken and not holds[e, g]:
                result[i] = g
                taken.add(g)
                break
    return result
