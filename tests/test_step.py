"""The layer step made for GPUs: capacity compiles whole and never reads the device; exact reads it once;
an overflowing capacity step is redone exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gloo import run_ranks
from rnq_ep.bench.syncs import count_syncs
from rnq_ep.layer import EPMoE
from rnq_ep.runtime.inputs import random_layer_weights
from test_layer import MODEL, SEED, dense_reference, random_layer_plan, tokens_of


def _layer(world: int, rank: int, transport: str, seed: int = 7, **kwargs) -> EPMoE:
    group = dist.group.WORLD if dist.is_initialized() else None
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    return EPMoE(MODEL, random_layer_plan(world, seed=seed, formats=("bf16", "int8")), world, rank, group,
                 w_gate_up, w_down, router, backend="torch", transport=transport, **kwargs)


@pytest.mark.parametrize("transport, syncs", [("exact", 1), ("capacity", 0)])
def test_a_layer_step_reads_the_device_once_exact_and_never_capacity(transport, syncs):
    layer = _layer(1, 0, transport)
    layer.redo_overflow = False  # a compiled caller's setting: overflow is read once per model step, not per layer
    x = tokens_of(0)
    layer(x)  # builds the table's device constants (once per plan switch)
    count = count_syncs(lambda: layer(x))
    assert count.total == syncs, count.syncs
    assert count.syncs["tolist"] == syncs


def _compiled_vs_eager(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank body: the capacity layer compiled whole (fullgraph) and eager, on this rank's tokens."""
    torch._dynamo.reset()
    layer = _layer(world, rank, "capacity")
    layer.redo_overflow = False
    x = tokens_of(rank)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)(x)
    assert not bool(layer.overflow)
    return eager, compiled


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_the_capacity_step_compiles_fullgraph_and_equals_eager_and_the_dense_reference(world):
    results = [_compiled_vs_eager(0, 1)] if world == 1 else run_ranks(_compiled_vs_eager, world, timeout=600)
    x = torch.cat([tokens_of(rank) for rank in range(world)])
    expected = dense_reference(x, random_layer_plan(world, seed=7, formats=("bf16", "int8")))
    for eager, compiled in results:
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([c for _, c in results]), expected, rtol=1e-5, atol=1e-5)


def _skewed_step(rank: int, world: int) -> tuple[torch.Tensor, bool, torch.Tensor, bool]:
    """Rank body: every token of every rank routed to rank 0's experts, capacity factor 1: it overflows."""
    layer = _layer(world, rank, "capacity", seed=11, capacity_factor=1.0)
    hot = torch.from_numpy(np.flatnonzero(layer.table.gpu == 0))[:1]
    expert = int(layer.table.expert[hot])
    x = tokens_of(rank)
    ids = torch.stack([torch.full((x.shape[0],), expert), torch.full((x.shape[0],), (expert + 1) % 8)], 1)
    weights = torch.full(ids.shape, 0.5)
    layer.redo_overflow = False
    dropped = layer.forward_routed(x, ids, weights)
    overflowed = bool(layer.overflow)
    layer.redo_overflow = True
    redone = layer.forward_routed(x, ids, weights)
    exact = _layer(world, rank, "exact", seed=11).forward_routed(x, ids, weights)
    return redone, overflowed, exact, torch.equal(dropped, exact)


@pytest.mark.slow
def test_an_overflowing_capacity_step_is_flagged_on_every_rank_and_redone_exactly():
    for redone, overflowed, exact, dropped_was_exact in run_ranks(_skewed_step, 2):
        assert overflowed and not dropped_was_exact
        torch.testing.assert_close(redone, exact, rtol=0, atol=0)
