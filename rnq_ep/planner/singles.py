"""Even out the number of single-copy experts per GPU by swapping them with replica copies.

Out of sample an expert's load is barely predicted by its planning load (OLMoE, 30 ordered corpus pairs: best
linear fit 0.87 + 0.13 x in units of the layer's mean expert load), and only single-copy experts pin load to
one GPU: the router can move a replica's tokens elsewhere. So a GPU's expected rigid load out of sample is
mostly its number of singles. Swapping a single on the GPU with the most singles for a same-format replica copy
on a GPU with at least two fewer keeps every GPU's bytes and the quantized tokens, and adds no duplicate copy.
"""

from __future__ import annotations

import numpy as np

from rnq_ep.planner.transport import Copies
from rnq_ep.specs import FORMATS


def even_singles(copies: Copies, num_experts: int, num_gpus: int, slack: float) -> Copies:
    """Copies (gpu, expert, fmt, tokens) [S] with singles on the GPU holding the most swapped for same-format
    replica copies on GPUs holding at least two fewer, while the planned max GPU load grows by at most `slack`
    (a fraction; least-loaded routing re-balances the replicas' tokens)."""
    gpu, expert, fmt, tokens = copies
    single = np.bincount(expert, minlength=num_experts)[expert] == 1  # [S]
    rigid = np.bincount(gpu[single], minlength=num_gpus)  # singles per GPU [G]
    fewest, most = int(rigid.min()), int(rigid.max())
    if most - fewest < 2:
        return copies
    crowded = single & (rigid[gpu] >= fewest + 2)  # singles that could leave [S]
    sparse = ~single & (rigid[gpu] <= most - 2)  # replica copies that could take their place [S]
    if not np.bincount(fmt[crowded], minlength=len(FORMATS)) @ np.bincount(fmt[sparse], minlength=len(FORMATS)):
        return copies  # no same-format swap (e.g. one bf16 copy per GPU against int4 singles)
    # a few swaps per layer: Python lists beat numpy's per-call overhead here
    load = np.bincount(gpu, weights=tokens, minlength=num_gpus).tolist()
    cap = max(load) * (1.0 + slack)
    rigid, on, names, codes, planned = rigid.tolist(), gpu.tolist(), expert.tolist(), fmt.tolist(), tokens.tolist()
    # copy indices per GPU, ascending: singles of GPU g are group 2g, its replica copies group 2g + 1
    group = 2 * gpu + ~single
    order = np.argsort(group, kind="stable").tolist()
    bounds = np.cumsum(np.bincount(group, minlength=2 * num_gpus)).tolist()
    lists = [order[lo:hi] for lo, hi in zip([0, *bounds[:-1]], bounds)]
    singles, replicas = lists[0::2], lists[1::2]
    while max(rigid) - min(rigid) >= 2:
        hi = max(range(num_gpus), key=rigid.__getitem__)
        held = {names[slot] for slot in singles[hi] + replicas[hi]}
        best, level = None, None  # (max load after, single, replica copy, its GPU); level: that GPU's singles
        for low in sorted((g for g in range(num_gpus) if rigid[g] <= rigid[hi] - 2), key=rigid.__getitem__):
            if best is not None and rigid[low] > level:
                break  # fewest singles first, then least load
            for b in replicas[low]:
                if names[b] in held:
                    continue
                for a in singles[hi]:
                    after = max(load[hi] - planned[a] + planned[b], load[low] - planned[b] + planned[a])
                    if after <= cap and codes[a] == codes[b] and (best is None or after < best[0]):
                        best, level = (after, a, b, low), rigid[low]
        if best is None:
            break
        _, a, b, low = best
        load[hi] += planned[b] - planned[a]
        load[low] += planned[a] - planned[b]
        rigid[hi] -= 1
        rigid[low] += 1
        singles[hi].remove(a), replicas[low].remove(b)
        singles[low].append(a), replicas[hi].append(b)
        on[a], on[b] = low, hi
    return np.array(on, dtype=gpu.dtype), expert, fmt, tokens

