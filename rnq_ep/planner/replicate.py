"""Replicate to balance: move load from the most loaded GPU to the least loaded through new copies.

Starting from one copy per expert, each step takes the most loaded GPU a and its heaviest copy
(expert e), and hands min(excess of a, deficit of h, tokens of the copy) of e's tokens to a new
copy of e on the least loaded GPU h that does not hold e yet (a whole copy simply moves). The
new copy's format, and any copies of h re-formatted to make room, are the cheapest choice that
keeps h within its bytes and the plan within the quality budget. As in McNaughton's wrap-around
rule this reaches the mean load with at most G-1 extra copies when memory allows.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from rnq_ep.planner.limits import Limits
from rnq_ep.planner.quantize import conversions_for_needs

TRIED_SINKS = 4  # least-loaded GPUs tried per copy before the next copy of the source GPU
MAX_STEPS_PER_COPY = 5  # bound on spread_load's steps (the pairwise halving converges geometrically)
HALVING_TOL = 1e-2  # pairwise halving stops at gaps below this fraction of the mean load


@dataclass
class LayerCopies:
    """Copies of one layer while planning; slot lists grow, a moved copy changes GPU."""

    gpu: list[int]
    expert: list[int]
    fmt: list[int]  # 0 bf16, 1 int8, 2 int4
    tokens: list[float]
    gpus_of: dict[int, list[int]]  # expert with 2+ copies -> the GPUs holding them, ascending (one copy: not here)
    slots_by_gpu: list[list[int]]  # [G] slots on GPU g, by expert
    copies: list[int]  # [E] copies per expert
    load: np.ndarray  # [G] planned tokens per GPU
    used: list[int]  # [G] bytes per GPU
    held: list[int]  # [G] copies per GPU
    quantized_tokens: float
    room_cache: dict[int, list] = field(default_factory=dict)  # gpu -> _room_plans, dropped when it changes
    loads: list[float] = field(default_factory=list)  # `load` as Python floats, for the per-step reads
    open_below: float = -math.inf  # a GPU below this load with a free slot can take a new copy
    open: list[tuple[float, int]] = field(default_factory=list)  # (load, gpu) of those GPUs, ascending

    def slots_on(self, gpu: int) -> list[int]:
        """Slot indices held by `gpu`, by expert -> [c]."""
        return list(self.slots_by_gpu[gpu])

    def slot_of(self, expert: int, gpu: int) -> int:
        """Slot index of `expert`'s copy on `gpu` (which holds one)."""
        slots = self.slots_by_gpu[gpu]
        return slots[bisect.bisect_left(slots, expert, key=self.expert.__getitem__)]


def spread_load(state: LayerCopies, limits: Limits, give_up_at: float = np.inf) -> None:
    """Add or move copies until every GPU is at the mean load or no allowed step helps (in place).

    A GPU that cannot reach the mean through a new copy evens out its load with the GPUs of its
    experts' other copies (pairwise halving of the gap), as least-loaded routing would; once no step
    can relieve it, it is stuck. Stuck GPUs never lose load, so the most loaded of them is a floor
    for the final max load: we stop when no other GPU is above that floor (further steps cannot
    lower the max) or when the floor reaches `give_up_at` (this state cannot beat a plan already found).
    """
    target = state.load.sum() / state.load.size
    tol = max(target * 1e-9, 1e-12)
    state.loads = state.load.tolist()
    state.open_below = target - tol
    state.open = sorted((x, g) for g, x in enumerate(state.loads) if x < state.open_below and state.held[g] < limits.max_held)
    stuck = _hopeless(state, limits, target, tol)
    floor = state.load[stuck].max() if stuck.any() else -np.inf
    for _ in range(MAX_STEPS_PER_COPY * len(state.gpu)):
        source = int(np.argmax(state.load))
        if stuck[source]:
            source = int(np.argmax(np.where(stuck, -np.inf, state.load)))
        load = state.load[source]
        if stuck[source] or load - target <= tol or floor >= give_up_at or load <= floor + tol:
            return
        if not _shift_from(state, limits, source, target, tol):
            if not _pour_to_existing(state, limits, source, state.slots_on(source), -np.inf, target * HALVING_TOL):
                stuck[source] = True
                floor = max(floor, state.load[stuck].max())


def _hopeless(state: LayerCopies, limits: Limits, target: float, tol: float) -> np.ndarray:
    """GPUs [G] that no step can relieve: no GPU below the target has a free slot, and none of
    their experts has a copy on a less loaded GPU. Vectorised, so full clusters skip the loop."""
    if ((state.load < target - tol) & (np.array(state.held) < limits.max_held)).any():
        return np.zeros(state.load.size, dtype=bool)
    gpu, expert = np.array(state.gpu), np.array(state.expert)
    lightest_copy = np.full(len(state.copies), np.inf)
    np.minimum.at(lightest_copy, expert, state.load[gpu])
    can_pour = lightest_copy[expert] < state.load[gpu] - tol
    return np.bincount(gpu[can_pour], minlength=state.load.size) == 0


def _shift_from(state: LayerCopies, limits: Limits, source: int, target: float, tol: float) -> bool:
    """One step away from GPU `source`; False when none of its copies can go anywhere."""
    slots = sorted(state.slots_on(source), key=lambda s: -state.tokens[s])  # heaviest first, ties by expert
    if _pour_to_existing(state, limits, source, slots, target, tol):
        return True
    loads = state.loads
    for slot in slots:
        expert, held = state.expert[slot], state.tokens[slot]
        want = min(loads[source] - target, held)
        for sink in _sink_order(state, limits, expert, source, target, want):
            amount = min(want, target - loads[sink])
            moves_all = amount >= held - tol
            if not moves_all and state.copies[expert] >= limits.max_copies:
                continue
            if sink not in state.room_cache:
                state.room_cache[sink] = _room_plans(state, limits, sink)
            choice = _cheapest_format(state, limits, slot, state.room_cache[sink], held if moves_all else amount)
            if choice is None:
                continue
            _apply(state, limits, slot, sink, held if moves_all else amount, moves_all, *choice)
            return True
    return False


def _pour_to_existing(
    state: LayerCopies, limits: Limits, source: int, slots: list[int], target: float, tol: float
) -> bool:
    """Move tokens from a copy on `source` to another copy of its expert on a lighter GPU.

    With a finite `target`, fill that GPU up to the target; with -inf, halve the gap between the two.
    """
    loads, finite = state.loads, math.isfinite(target)
    for slot in slots:
        expert = state.expert[slot]
        if state.copies[expert] == 1 or state.tokens[slot] <= tol:
            continue
        ceiling = target if finite else loads[source]
        sink = min(state.gpus_of[expert], key=loads.__getitem__)  # ties: lower GPU
        if loads[sink] >= ceiling - tol:
            continue
        other = state.slot_of(expert, sink)
        if finite:
            amount = min(loads[source] - target, target - loads[sink], state.tokens[slot])
        else:
            amount = min((loads[source] - loads[sink]) / 2, state.tokens[slot])
        token_change = (amount if state.fmt[other] else 0.0) - (amount if state.fmt[slot] else 0.0)
        if state.quantized_tokens + token_change > limits.token_budget + 1e-9 * max(limits.token_budget, 1.0):
            continue
        state.quantized_tokens += token_change
        state.tokens[slot] -= amount
        state.tokens[other] += amount
        _change(state, limits, source, -amount, 0)
        _change(state, limits, sink, amount, 0)
        return True
    return False


def _change(state: LayerCopies, limits: Limits, gpu: int, amount: float, copies: int) -> None:
    """Add `amount` tokens and `copies` copies to `gpu`'s load and count; keeps `open` sorted, drops its room plans."""
    before, held = state.loads[gpu], state.held[gpu]
    if before < state.open_below and held < limits.max_held:
        del state.open[bisect.bisect_left(state.open, (before, gpu))]
    after = before + amount
    state.loads[gpu] = after
    state.load[gpu] = after
    state.held[gpu] = held + copies
    if after < state.open_below and held + copies < limits.max_held:
        bisect.insort(state.open, (after, gpu))
    state.room_cache.pop(gpu, None)


def _sink_order(state: LayerCopies, limits: Limits, expert: int, source: int, target: float, want: float) -> list[int]:
    """The first TRIED_SINKS GPUs below the target with a free slot and no copy of `expert`, least loaded
    first (ties: lower GPU); with prefer_node, same-node GPUs that can take `want` lead."""
    holders = state.gpus_of.get(expert, (source,))  # not there: its one copy is the one on `source`
    order = []
    for _, g in state.open:
        if g not in holders:
            order.append(g)
            if len(order) == TRIED_SINKS:
                break
    if not limits.prefer_node:
        return order
    loads, size = state.loads, limits.gpus_per_node
    node = source // size
    near = [g for g in range(node * size, min((node + 1) * size, len(loads)))
            if loads[g] < state.open_below and state.held[g] < limits.max_held and g not in holders and g not in order]
    order = sorted(order + near, key=lambda g: (loads[g], g))
    lead = [g for g in order if g // size == node and target - loads[g] >= want]
    return (lead + [g for g in order if g not in lead])[:TRIED_SINKS]


def _room_plans(state: LayerCopies, limits: Limits, sink: int) -> list:
    """For each format code: (sink slots, their new formats, quality cost, added quantized tokens) or None
    (also None for a format no expert may use)."""
    room = limits.budget - state.used[sink]
    slots = state.slots_on(sink)
    moves = [limits.moves[state.expert[s]][state.fmt[s]] for s in slots]
    needs = [limits.sizes[code] - room for code in limits.allowed_codes]
    freed_by_code = conversions_for_needs([state.fmt[s] for s in slots], [state.tokens[s] for s in slots], moves, needs)
    plans: list = [None] * limits.fmt_bytes.size
    for code, freed in zip(limits.allowed_codes, freed_by_code):
        plans[code] = None if freed is None else (slots, freed[0], freed[1], freed[2])
    return plans


def _cheapest_format(
    state: LayerCopies, limits: Limits, slot: int, room_plans: list, amount: float
) -> tuple[int, list[int], list[int], float] | None:
    """Best (format of the new copy, sink slots, their new formats, token change) or None if nothing fits."""
    expert = state.expert[slot]
    leaves_quantized = amount if state.fmt[slot] else 0.0
    best = None
    for code, per_token in enumerate(limits.cost_rows[expert]):
        if room_plans[code] is None or not math.isfinite(per_token):
            continue
        sink_slots, new_fmt, cost, tokens = room_plans[code]
        tokens += (amount if code else 0.0) - leaves_quantized
        if state.quantized_tokens + tokens > limits.token_budget + 1e-9 * max(limits.token_budget, 1.0):
            continue
        cost += amount * per_token
        if best is None or cost < best[0]:
            best = (cost, (code, sink_slots, new_fmt, tokens))
    return None if best is None else best[1]


def _apply(
    state: LayerCopies,
    limits: Limits,
    slot: int,
    sink: int,
    amount: float,
    moves_all: bool,
    code: int,
    sink_slots: list[int],
    sink_fmt: list[int],
    token_change: float,
) -> None:
    """Carry out one step: re-format sink copies, then add (or move) the copy of `slot`'s expert."""
    fmt_bytes = limits.sizes
    for s, f in zip(sink_slots, sink_fmt):
        state.used[sink] += fmt_bytes[f] - fmt_bytes[state.fmt[s]]
        state.fmt[s] = f
    expert, source = state.expert[slot], state.gpu[slot]
    state.quantized_tokens += token_change
    _change(state, limits, source, -amount, -1 if moves_all else 0)
    _change(state, limits, sink, amount, 1)
    state.used[sink] += fmt_bytes[code]
    if moves_all:
        state.used[source] -= fmt_bytes[state.fmt[slot]]
        if expert in state.gpus_of:
            state.gpus_of[expert].remove(source)
            bisect.insort(state.gpus_of[expert], sink)
        state.slots_by_gpu[source].remove(slot)
        bisect.insort(state.slots_by_gpu[sink], slot, key=state.expert.__getitem__)
        state.gpu[slot], state.fmt[slot] = sink, code
        return
    state.tokens[slot] -= amount
    bisect.insort(state.gpus_of.setdefault(expert, [source]), sink)
    state.gpu.append(sink)
    state.expert.append(expert)
    bisect.insort(state.slots_by_gpu[sink], len(state.gpu) - 1, key=state.expert.__getitem__)
    state.fmt.append(code)
    state.tokens.append(amount)
    state.copies[expert] += 1
