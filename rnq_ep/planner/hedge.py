"""Hedge copies: spend the quality budget that balancing the planning loads left on spare copies.

An expert's load on another data set is barely predicted by its planning load (OLMoE, 6 corpora x 3 layers,
every ordered pair: correlation 0.13 between an expert's load in one corpus and in another), so out of sample
the most loaded GPU is one whose single-copy experts turned hot, and the router can move nothing off it. A
spare copy of a single-copy expert, with no planned tokens, gives the router that way out. Only quantized
singles get one: the router splits an expert's tokens over its copies, and between two quantized copies that
moves no tokens onto quantized copies in sample. Room is made by re-formatting the sink's bf16 copies of least
quality cost, so the quality budget prices every hedge.
"""

from __future__ import annotations

import numpy as np

from rnq_ep.planner.limits import Limits
from rnq_ep.planner.quantize import cheapest_conversions_by_gpu
from rnq_ep.planner.transport import Copies, stack_layers


HEDGE_RESERVE = 0.15  # share of the quality budget hedge copies leave unspent, for what the router adds in sample


def hedge_copies(copies: Copies, limits: Limits, num_gpus: int, reserve: float = HEDGE_RESERVE) -> Copies:
    """Copies (gpu, expert, fmt, tokens) [S] plus token-free copies [S + h] of quantized single-copy experts
    (heaviest first), at most one per GPU, on the GPUs whose room costs the fewest re-formatted bf16 tokens
    first, while the quantized tokens stay within (1 - reserve) x limits.token_budget."""
    return hedge_layers([copies], [limits], num_gpus, reserve)[0]


def hedge_layers(layers: list[Copies], limits_of: list[Limits], num_gpus: int, reserve: float = HEDGE_RESERVE) -> list[Copies]:
    """`hedge_copies` of every layer ([L] copies and limits); the room costs of layers that share their
    bytes, costs and hedge format come from one `room_costs` call, their GPUs numbered apart (layer x G + g)."""
    waiting_of: dict[int, tuple[float, int, list[int]]] = {}  # layer -> (spare tokens, hedge format, waiting slots)
    for index, ((_, expert, fmt, tokens), limits) in enumerate(zip(layers, limits_of)):
        spare = limits.token_budget * (1.0 - reserve) - float(tokens[fmt > 0].sum())
        code = hedge_format(limits) if spare >= 0 and limits.max_copies > 1 else None
        if code is None:
            continue
        single = np.bincount(expert, minlength=limits.cost.shape[0])[expert] == 1
        waiting = np.flatnonzero(single & (fmt > 0))
        if waiting.size:
            waiting_of[index] = spare, code, waiting[np.argsort(-tokens[waiting], kind="stable")].tolist()
    groups: dict[tuple, list[int]] = {}
    for index, (_, code, _) in waiting_of.items():
        limits = limits_of[index]
        groups.setdefault((id(limits.cost), limits.budget, limits.max_held, code), []).append(index)
    out = list(layers)
    for (_, _, _, code), members in groups.items():
        _, stacked = stack_layers([layers[i] for i in members], num_gpus)
        cost, converted = room_costs(stacked, limits_of[members[0]], num_gpus * len(members), code)
        ends = np.cumsum([layers[i][0].size for i in members])[:-1]
        for k, (index, part) in enumerate(zip(members, np.split(converted, ends))):
            spare, _, waiting = waiting_of[index]
            out[index] = place_hedges(layers[index], code, waiting, spare, cost[k * num_gpus:(k + 1) * num_gpus], part)
    return out


def place_hedges(copies: Copies, code: int, waiting: list[int], spare: float, cost: np.ndarray, converted: np.ndarray) -> Copies:
    """Copies [S + h]: a hedge copy in format `code` of the next waiting slot (heaviest first) on each GPU by
    room cost [G], cheapest first, while the costs fit in `spare` tokens; the sinks' `converted` [S] bf16
    copies re-formatted to make the room."""
    gpu, expert, fmt, tokens = copies
    sinks = np.flatnonzero(np.isfinite(cost))
    sinks = sinks[np.argsort(cost[sinks], kind="stable")]
    on = gpu.tolist()
    chosen, hedged = [], []
    for sink, price in zip(sinks.tolist(), cost[sinks].tolist()):
        if price > spare:
            break  # sinks come cheapest first
        slot = next((s for s in waiting if on[s] != sink), None)
        if slot is not None:
            waiting.remove(slot)
            chosen.append(sink)
            hedged.append(int(expert[slot]))
            spare -= price
    if not chosen:
        return copies
    is_sink = np.zeros(cost.size, dtype=bool)
    is_sink[chosen] = True
    fmt = np.where(converted & is_sink[gpu], code, fmt)
    new = len(chosen)
    return (
        np.concatenate([gpu, chosen]),
        np.concatenate([expert, hedged]),
        np.concatenate([fmt, np.full(new, code, dtype=fmt.dtype)]),
        np.concatenate([tokens, np.zeros(new)]),
    )


def hedge_format(limits: Limits) -> int | None:
    """The finest quantized format code that every expert may use, or None."""
    return next((code for code in limits.common_codes if code > 0), None)


def room_costs(copies: Copies, limits: Limits, num_gpus: int, code: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens re-formatted to make room for one more copy in format `code`, per GPU [G], inf where it cannot;
    the bf16 copies [S] each GPU re-formats for it): `cheapest_conversions_by_gpu` with bf16 -> `code` the
    only step allowed, so its bf16 copies of least quality cost first."""
    gpu, expert, fmt, tokens = copies
    sizes = limits.fmt_bytes
    room = limits.budget - np.bincount(gpu, weights=sizes[fmt], minlength=num_gpus)
    only = np.full((gpu.size, sizes.size), np.inf)  # each copy may stay as it is; a bf16 one may become `code`
    only[np.arange(gpu.size), fmt] = 0.0
    bf16 = fmt == 0
    only[bf16, code] = limits.cost[expert[bf16], code]
    need = np.maximum(sizes[code] - room, 0)
    converted = cheapest_conversions_by_gpu(gpu, fmt, tokens, only, sizes, need, allow_smallest=False) != fmt
    cost = np.bincount(gpu[converted], weights=tokens[converted], minlength=num_gpus)
    freed = np.bincount(gpu[converted], minlength=num_gpus) * int(sizes[0] - sizes[code])
    fits = (freed >= need) & (np.bincount(gpu, minlength=num_gpus) < limits.max_held)
    return np.where(fits, cost, np.inf), converted
