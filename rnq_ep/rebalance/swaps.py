"""Swap copies of a fresh plan back to where the old plan had them, at (almost) no cost in balance (pure).

A fresh plan groups experts its own way, so relabelling GPUs (`keep_in_place`) still leaves most
copies moving. Here a copy that would move from GPU a is swapped with a copy of the same format on
a GPU b that held its expert before: memory is unchanged (equal bytes), no GPU gets two copies of
one expert, and both GPUs' planned loads (window count x share) stay within 1 + `slack` of the
plan's largest. One greedy pass over the copies, in slot order: deterministic.
"""

from __future__ import annotations

from collections import defaultdict

import msgspec
import numpy as np

from rnq_ep.specs import LayerPlan, Slot

SWAP_SLACK = 0.005  # a swap may raise a GPU's planned load to 0.5 % above the plan's largest


def swap_into_place(old: LayerPlan, new: LayerPlan, counts: np.ndarray, slack: float = SWAP_SLACK) -> LayerPlan:
    """`new` with same-format copies swapped between GPUs so more of them stay where `old` had them; counts [E]."""
    held = {(s.gpu, s.expert): s.fmt for s in old.slots}
    holders: dict[int, list[int]] = defaultdict(list)  # expert -> GPUs that held it
    for slot in old.slots:
        holders[slot.expert].append(slot.gpu)
    slots = list(new.slots)
    load = [float(counts[s.expert]) * s.share for s in slots]  # planned tokens per copy
    gpu_load: dict[int, float] = defaultdict(float)
    on_gpu: dict[int, set[int]] = defaultdict(set)  # GPU -> indices into slots
    for index, slot in enumerate(slots):
        gpu_load[slot.gpu] += load[index]
        on_gpu[slot.gpu].add(index)
    cap = max(gpu_load.values(), default=0.0) * (1 + slack)
    pairs = {(s.gpu, s.expert) for s in slots}

    def in_place(slot: Slot, gpu: int) -> bool:
        """GPU held slot's expert in its format, or in bf16 (quantized in place)."""
        fmt = held.get((gpu, slot.expert))
        return fmt is not None and fmt in (slot.fmt, "bf16")

    def partner(i: int) -> int | None:
        """A copy j on a GPU that held slot i's expert, whose swap with i keeps i in place and breaks nothing."""
        s, a = slots[i], slots[i].gpu
        for b in holders[s.expert]:
            if b == a or (b, s.expert) in pairs or not in_place(s, b):
                continue
            for j in sorted(on_gpu[b]):
                t = slots[j]
                if t.fmt != s.fmt or in_place(t, b) or (a, t.expert) in pairs:
                    continue
                if max(gpu_load[a] - load[i] + load[j], gpu_load[b] - load[j] + load[i]) <= cap:
                    return j
        return None

    for i in range(len(slots)):
        if in_place(slots[i], slots[i].gpu) or (j := partner(i)) is None:
            continue
        a, b = slots[i].gpu, slots[j].gpu
        pairs -= {(a, slots[i].expert), (b, slots[j].expert)}
        pairs |= {(b, slots[i].expert), (a, slots[j].expert)}
        gpu_load[a] += load[j] - load[i]
        gpu_load[b] += load[i] - load[j]
        on_gpu[a] ^= {i, j}
        on_gpu[b] ^= {i, j}
        slots[i], slots[j] = msgspec.structs.replace(slots[i], gpu=b), msgspec.structs.replace(slots[j], gpu=a)
    return LayerPlan(layer=new.layer, slots=sorted(slots, key=lambda s: s.gpu))
