"""swap_into_place: swapping same-format copies back to where the old plan had them keeps memory, never puts
two copies of one expert on a GPU, keeps the planned loads within the slack and only ever keeps more in place."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rnq_ep.rebalance.swaps import swap_into_place
from rnq_ep.specs import FORMATS, LayerPlan, Slot

EXPERTS = 8


def random_layer(num_gpus: int, rng: np.random.Generator) -> LayerPlan:
    """Every expert once on a random GPU plus a few replicas, random formats, shares splitting each expert evenly."""
    pairs = {(int(rng.integers(num_gpus)), e) for e in range(EXPERTS)}
    pairs |= {(int(rng.integers(num_gpus)), int(rng.integers(EXPERTS))) for _ in range(6)}
    copies = np.bincount([e for _, e in pairs], minlength=EXPERTS)
    return LayerPlan(layer=0, slots=[Slot(gpu=g, expert=e, fmt=str(rng.choice(FORMATS[:2])), share=1.0 / copies[e])
                                     for g, e in sorted(pairs)])


def kept_copies(old: LayerPlan, new: LayerPlan) -> int:
    held = {(s.gpu, s.expert): s.fmt for s in old.slots}
    return sum(held.get((s.gpu, s.expert)) in (s.fmt, "bf16") for s in new.slots)


def gpu_loads(layer: LayerPlan, counts: np.ndarray, num_gpus: int) -> np.ndarray:
    return np.bincount([s.gpu for s in layer.slots], weights=[counts[s.expert] * s.share for s in layer.slots], minlength=num_gpus)


@settings(max_examples=80, deadline=None)
@given(num_gpus=st.integers(2, 6), seed=st.integers(0, 2**32 - 1), slack=st.sampled_from([0.0, 0.005, 0.1]))
def test_swaps_keep_memory_and_balance_and_keep_more_in_place(num_gpus, seed, slack):
    rng = np.random.default_rng(seed)
    old, new = random_layer(num_gpus, rng), random_layer(num_gpus, rng)
    counts = rng.integers(1, 100, EXPERTS).astype(float)
    swapped = swap_into_place(old, new, counts, slack)
    assert sorted((s.expert, s.fmt, s.share) for s in swapped.slots) == sorted((s.expert, s.fmt, s.share) for s in new.slots)
    for gpu in range(num_gpus):  # the same formats on every GPU: the same bytes
        assert sorted(s.fmt for s in swapped.slots if s.gpu == gpu) == sorted(s.fmt for s in new.slots if s.gpu == gpu)
    assert len({(s.gpu, s.expert) for s in swapped.slots}) == len(swapped.slots)
    before, after = gpu_loads(new, counts, num_gpus), gpu_loads(swapped, counts, num_gpus)
    assert after.max() <= before.max() * (1 + slack) + 1e-9
    assert kept_copies(old, swapped) >= kept_copies(old, new)
    assert [s.gpu for s in swapped.slots] == sorted(s.gpu for s in swapped.slots)


def test_two_copies_placed_the_other_way_round_are_swapped_back_unless_that_overloads_a_gpu():
    def layer(*gpu_experts):
        return LayerPlan(layer=0, slots=[Slot(gpu=g, expert=e, fmt="int8", share=1.0) for g, e in gpu_experts])

    old = layer((0, 0), (0, 2), (1, 1), (1, 3))
    new = layer((0, 1), (0, 2), (1, 0), (1, 3))  # experts 0 and 1 trade places
    def placed(plan):
        return sorted((s.gpu, s.expert) for s in plan.slots)

    assert placed(swap_into_place(old, new, np.array([10.0, 10.0, 25.0, 5.0]))) == placed(old)
    # with expert 0 at 30 tokens, putting it back next to expert 2 would load GPU 0 with 55 against 35 now
    assert placed(swap_into_place(old, new, np.array([30.0, 10.0, 25.0, 5.0]))) == placed(new)
