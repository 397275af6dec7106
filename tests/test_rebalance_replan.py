"""keep_in_place: relabelling nodes and GPUs within nodes never changes what a plan holds, and a plan that is
the old one with its nodes and GPUs shuffled is recognised as the old one (nothing moves)."""

import msgspec
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.balance import SlotTable
from rnq_ep.rebalance.moves import copy_moves
from rnq_ep.rebalance.replan import keep_in_place
from rnq_ep.specs import FORMATS, LayerPlan, Slot, load_cluster, load_model

MODEL = load_model("tiny")  # 8 experts


def cluster_of(nodes: int, per_node: int):
    return msgspec.structs.replace(load_cluster("h100x8"), name=f"test{nodes}x{per_node}", nodes=nodes, gpus_per_node=per_node)


def random_layer(num_gpus: int, rng: np.random.Generator) -> LayerPlan:
    """Every expert once on a random GPU plus a few replicas, random formats."""
    pairs = {(int(rng.integers(num_gpus)), e) for e in range(MODEL.num_experts)}
    pairs |= {(int(rng.integers(num_gpus)), int(rng.integers(MODEL.num_experts))) for _ in range(6)}
    return LayerPlan(layer=0, slots=[Slot(gpu=g, expert=e, fmt=str(rng.choice(FORMATS)), share=1.0) for g, e in sorted(pairs)])


@settings(max_examples=40, deadline=None)
@given(nodes=st.integers(1, 4), per_node=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_a_plan_with_shuffled_nodes_and_gpus_keeps_every_copy_in_place(nodes, per_node, seed):
    rng = np.random.default_rng(seed)
    cluster, g = cluster_of(nodes, per_node), nodes * per_node
    old = random_layer(g, rng)
    node_order, local_order = rng.permutation(nodes), [rng.permutation(per_node) for _ in range(nodes)]
    label = np.array([node_order[gpu // per_node] * per_node + local_order[gpu // per_node][gpu % per_node] for gpu in range(g)])
    shuffled = LayerPlan(layer=0, slots=[msgspec.structs.replace(s, gpu=int(label[s.gpu])) for s in old.slots])
    kept = keep_in_place(old, shuffled, MODEL, cluster)
    moves = copy_moves(SlotTable.from_layer(old, g, MODEL.num_experts), SlotTable.from_layer(kept, g, MODEL.num_experts), MODEL)
    assert {m.kind for m in moves} == {"keep"}


@settings(max_examples=40, deadline=None)
@given(nodes=st.integers(1, 3), per_node=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_relabelling_keeps_each_node_and_gpu_holding_the_same_copies(nodes, per_node, seed):
    rng = np.random.default_rng(seed)
    cluster, g = cluster_of(nodes, per_node), nodes * per_node
    old, new = random_layer(g, rng), random_layer(g, rng)
    kept = keep_in_place(old, new, MODEL, cluster)
    held = lambda plan: sorted(sorted((s.expert, s.fmt) for s in plan.slots if s.gpu == gpu) for gpu in range(g))  # noqa: E731
    assert held(kept) == held(new)  # GPUs only swap labels
    by_node = lambda plan: sorted(sorted((s.expert, s.fmt) for s in plan.slots if s.gpu // per_node == n) for n in range(nodes))  # noqa: E731
    assert by_node(kept) == by_node(new)  # whole nodes swap, no GPU changes node
