"""Migration exactness, as SGLang's weight-updater test: random plan sequences on 2 and 4 gloo ranks.

After every switch each rank's copies are the expected bytes (bf16 bit for bit, int8/int4 data and
scales equal to quantize(full weight)), and the layer's output equals a layer built from scratch
on the new plan. An injected failure on one rank leaves every rank on the old plan.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gloo import run_ranks
from rnq_ep.balance import SlotTable
from rnq_ep.layer import EPMoE
from rnq_ep.memory import expert_bytes
from rnq_ep.quant import quantize
from rnq_ep.rebalance.migrate import LayerMigration, migrate_layer
from rnq_ep.rebalance.moves import copy_moves
from rnq_ep.runtime.inputs import random_layer_weights
from rnq_ep.specs import FORMATS, LayerPlan, Slot, load_model

MODEL = load_model("tiny")  # H 96, I 160, 8 experts, top-2
SEED = 5
TOKENS = 16
SWITCHES = 3


def random_plan(num_gpus: int, rng: np.random.Generator) -> LayerPlan:
    """Each expert on a random GPU, a few replicas elsewhere, every copy in a random format."""
    pairs = {(int(rng.integers(num_gpus)), e) for e in range(MODEL.num_experts)}
    for e in rng.choice(MODEL.num_experts, size=4, replace=False):
        free = [g for g in range(num_gpus) if (g, int(e)) not in pairs]
        if free:
            pairs.add((int(rng.choice(free)), int(e)))
    copies = np.bincount([e for _, e in pairs], minlength=MODEL.num_experts)
    return LayerPlan(
        layer=0,
        slots=[Slot(gpu=g, expert=e, fmt=str(rng.choice(FORMATS)), share=1.0 / copies[e]) for g, e in sorted(pairs)],
    )


def plan_sequence(world: int, seed: int) -> list[LayerPlan]:
    """SWITCHES + 1 random plans, the same on every rank and in the parent."""
    rng = np.random.default_rng(seed)
    return [random_plan(world, rng) for _ in range(SWITCHES + 1)]


def copies_match(layer: EPMoE, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Every local copy's stored data and scales equal quantize(full weight, its format), bit for bit."""
    for j, slot in enumerate(layer.experts.slots):
        e, fmt = int(layer.table.expert[slot]), str(FORMATS[layer.table.fmt[slot]])
        for held, full in zip(layer.experts.copy_weights(j), (w_gate_up[e], w_down[e])):
            want = quantize(full, fmt)
            if held.fmt != fmt or not torch.equal(held.data, want.data):
                return False
            if want.scale is not None and not torch.equal(held.scale, want.scale):
                return False
    return True


def migrate_through(
    rank: int, world: int, seed: int, fail_rank: int = -1, fail_phase: str = "", copies_per_step: int = 4
) -> list[dict]:
    """Walk the plan sequence on this rank, serving between chunks; per switch: agreed, copies exact, outputs right."""
    group = dist.group.WORLD
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    plans = plan_sequence(world, seed)
    layer = EPMoE(MODEL, plans[0], world, rank, group, w_gate_up, w_down, router, backend="torch")
    x = torch.randn(TOKENS, MODEL.hidden_size, generator=torch.Generator().manual_seed(rank))

    def fault(phase: str) -> None:
        if rank == fail_rank and phase == fail_phase:
            raise RuntimeError(f"injected failure in {phase}")

    results = []
    for plan in plans[1:]:
        before = layer.table
        old = EPMoE(MODEL, _plan_of(before), world, rank, group, w_gate_up, w_down, router, backend="torch")
        table = SlotTable.from_layer(plan, world, MODEL.num_experts)
        migration = LayerMigration(layer, table, lambda e: (w_gate_up[e], w_down[e]), fault, copies_per_step)
        served_old = True
        while (move := migration.advance()) is None:
            served_old = served_old and torch.equal(layer(x), old(x))  # serving goes on while copies are staged
        fresh = EPMoE(MODEL, plan, world, rank, group, w_gate_up, w_down, router, backend="torch") if move.switched else old
        results.append(
            {
                "switched": move.switched,
                "table_unchanged": layer.table is before,
                "copies_exact": copies_match(layer, w_gate_up, w_down),
                "output_equal": torch.equal(layer(x), fresh(x)),
                "served_old_while_staging": served_old,
                "bytes_sent": move.bytes_sent,
                "bytes_received": move.bytes_received,
                "peak_staging_bytes": migration.peak_staging_bytes,
                "staging_bound": staging_bound(before, table, rank, copies_per_step),
            }
        )
    return results


def staging_bound(old: SlotTable, new: SlotTable, rank: int, copies_per_step: int) -> int:
    """The stated bound: changed copies this rank receives or makes, plus one chunk's buffers (each copy sent or received)."""
    changed = [m for m in copy_moves(old, new, MODEL) if m.kind != "keep"]
    chunk = copies_per_step or len(changed)
    return sum(expert_bytes(MODEL, m.fmt) for m in changed if m.dst == rank) + chunk * expert_bytes(MODEL, "bf16")


def _plan_of(table: SlotTable) -> LayerPlan:
    """The LayerPlan a table was made from (shares do not affect least-loaded routing)."""
    return LayerPlan(
        layer=0,
        slots=[
            Slot(gpu=int(g), expert=int(e), fmt=FORMATS[f], share=float(s))
            for g, e, f, s in zip(table.gpu, table.expert, table.fmt, table.share)
        ],
    )


@pytest.fixture(scope="module", params=[2, 4, pytest.param(8, marks=pytest.mark.slow)])
def walk(request) -> tuple[int, list[list[dict]]]:
    world = request.param
    return world, run_ranks(migrate_through, world, world)  # chunks of 4 changed copies per step


def test_every_rank_switches_on_every_plan(walk):
    world, results = walk
    assert all(r["switched"] for rank in results for r in rank)


def test_copies_after_each_switch_equal_the_quantized_full_weights(walk):
    world, results = walk
    assert all(r["copies_exact"] for rank in results for r in rank)


def test_outputs_after_each_switch_equal_a_layer_built_on_the_new_plan(walk):
    world, results = walk
    assert all(r["output_equal"] for rank in results for r in rank)


def test_serving_continues_on_the_old_plan_while_copies_are_staged(walk):
    world, results = walk
    assert all(r["served_old_while_staging"] for rank in results for r in rank)


def test_staging_stays_within_the_stated_bound(walk):
    world, results = walk
    assert all(r["peak_staging_bytes"] <= r["staging_bound"] for rank in results for r in rank)
    assert any(r["peak_staging_bytes"] > 0 for rank in results for r in rank)  # it measures something


def test_bytes_sent_equal_bytes_received_over_all_ranks(walk):
    world, results = walk
    for switch in range(SWITCHES):
        assert sum(rank[switch]["bytes_sent"] for rank in results) == sum(rank[switch]["bytes_received"] for rank in results)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["pack", "stage"])
def test_a_failure_on_one_rank_keeps_every_rank_on_the_old_plan(phase):
    results = run_ranks(migrate_through, 2, 2, 1, phase, 0)  # the whole layer in one call
    for rank in results:
        assert not any(r["switched"] for r in rank)
        assert all(r["table_unchanged"] and r["copies_exact"] and r["output_equal"] for r in rank)


def test_only_changed_copies_move():
    plans = plan_sequence(4, seed=4)
    old = SlotTable.from_layer(plans[0], 4, MODEL.num_experts)
    moves = copy_moves(old, old, MODEL)
    assert {m.kind for m in moves} == {"keep"}
    new = SlotTable.from_layer(plans[1], 4, MODEL.num_experts)
    for move in copy_moves(old, new, MODEL):
        if move.kind in ("peer", "local"):
            assert old.expert[move.src_slot] == move.expert
            assert FORMATS[old.fmt[move.src_slot]] in (move.fmt, "bf16")


def test_world_one_migration_switches_without_collectives():
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    plans = plan_sequence(1, seed=1)
    layer = EPMoE(MODEL, plans[0], 1, 0, None, w_gate_up, w_down, router, backend="torch")
    move = migrate_layer(layer, SlotTable.from_layer(plans[1], 1, MODEL.num_experts), lambda e: (w_gate_up[e], w_down[e]))
    assert move.switched and move.bytes_sent == 0
    assert copies_match(layer, w_gate_up, w_down)


def test_a_gpt_oss_layer_is_refused_rather_than_migrated_without_its_biases():
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    plans = plan_sequence(1, seed=1)
    layer = EPMoE(MODEL, plans[0], 1, 0, None, w_gate_up, w_down, router, backend="torch", activation="swiglu-oai")
    with pytest.raises(NotImplementedError, match="swiglu-oai"):
        LayerMigration(layer, SlotTable.from_layer(plans[1], 1, MODEL.num_experts))


def test_the_old_copies_are_freed_after_the_switch():
    w_gate_up, w_down, router = random_layer_weights(MODEL, 0, SEED)
    plans = plan_sequence(1, seed=2)
    layer = EPMoE(MODEL, plans[0], 1, 0, None, w_gate_up, w_down, router, backend="torch")
    old_copies = weakref.ref(layer.experts)
    migration = LayerMigration(layer, SlotTable.from_layer(plans[1], 1, MODEL.num_experts), lambda e: (w_gate_up[e], w_down[e]))
    assert migration.advance().switched
    gc.collect()
    assert old_copies() is None  # nothing (the migration included) still holds the old layer's copies
