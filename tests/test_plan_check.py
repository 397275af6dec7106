"""specs.check_plan: a plan the planner made passes; each way a hand-edited plan can break is named."""

from __future__ import annotations

import msgspec
import pytest

from rnq_ep.planner import plan_eplb, plan_plain_ep, plan_rnq
from rnq_ep.specs import LoadStats, Plan, PlanOptions, SpecError, check_plan, load_cluster, load_model

MODEL = load_model("tiny")
CLUSTER = load_cluster("cpu4")
LOADS = LoadStats(counts=[[900, 50, 40, 30, 20, 10, 5, 1], [10, 10, 10, 10, 10, 10, 10, 930]], num_experts=8, top_k=2)


def rnq_plan() -> Plan:
    return plan_rnq(MODEL, CLUSTER, LOADS, PlanOptions(formats=("bf16", "int8", "int4")))


def edit_slots(plan: Plan, layer: int, edit) -> Plan:
    """The plan with layer `layer`'s slot list replaced by edit(list of slot dicts)."""
    raw = msgspec.to_builtins(plan)
    raw["layers"][layer]["slots"] = edit(raw["layers"][layer]["slots"])
    return msgspec.convert(raw, Plan)


def test_plans_the_planners_make_pass():
    for plan in (rnq_plan(), plan_plain_ep(MODEL, CLUSTER, LOADS), plan_eplb(MODEL, CLUSTER, LOADS)):
        check_plan(plan)


def first_replica(slots: list[dict]) -> int:
    """Index of a slot whose expert has another copy."""
    experts = [s["expert"] for s in slots]
    return next(i for i, e in enumerate(experts) if experts.count(e) > 1)


def set_field(key: str, value):
    def edit(slots):
        slots[0][key] = value
        return slots

    return edit


def second_copy_on_the_same_gpu(slots):
    i = first_replica(slots)
    twin = next(j for j, s in enumerate(slots) if s["expert"] == slots[i]["expert"] and j != i)
    slots[twin]["gpu"] = slots[i]["gpu"]
    return sorted(slots, key=lambda s: s["gpu"])


def drop_only_copy(slots):
    experts = [s["expert"] for s in slots]
    single = next(i for i, e in enumerate(experts) if experts.count(e) == 1)
    return slots[:single] + slots[single + 1:]


def everything_on_gpu_0(slots):
    for s in slots:
        s["gpu"] = 0
    return slots


def gpus_out_of_order(slots):
    return slots[::-1]


BROKEN = {
    "gpu out of range": (set_field("gpu", 4), r"slots\[0\]: gpu 4 out of range, the cluster has 4 GPUs"),
    "negative gpu": (set_field("gpu", -1), r"slots\[0\]: gpu -1 out of range"),
    "unknown expert": (set_field("expert", 8), r"slots\[0\]: unknown expert 8, the model has 8"),
    "negative share": (set_field("share", -0.5), r"slots\[0\]: share -0.5, expected a finite number >= 0"),
    "shares not summing to 1": (set_field("share", 0.5), r"shares of expert \d+'s copies sum to .*, expected 1"),
    "two copies on one gpu": (second_copy_on_the_same_gpu, r"a second copy of expert \d+ on gpu \d+"),
    "expert without a copy": (drop_only_copy, r"expert \d+ has no copy"),
    "every copy on gpu 0": (everything_on_gpu_0, r"(a second copy of expert|gpu 0 holds \d+ expert bytes, over)"),
    "slots not by gpu": (gpus_out_of_order, r"expected slots by gpu"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_plan_is_refused_naming_the_layer_slot_and_what_was_expected(case):
    edit, message = BROKEN[case]
    with pytest.raises(SpecError, match=r"plan: layers\[0\] \(layer 0\)"):
        check_plan(edit_slots(rnq_plan(), 0, edit))
    with pytest.raises(SpecError, match=message):
        check_plan(edit_slots(rnq_plan(), 0, edit))


def test_a_gpu_over_the_plans_own_budget_is_refused():
    plan = plan_plain_ep(MODEL, CLUSTER, LOADS)
    tight = msgspec.structs.replace(plan, options=PlanOptions(formats=("bf16",), memory_budget=1000))
    with pytest.raises(SpecError, match=r"gpu \d holds \d+ expert bytes, over the plan's budget of 1000"):
        check_plan(tight)


def test_layer_ids_beyond_the_model_are_refused():
    plan = rnq_plan()
    raw = msgspec.to_builtins(plan)
    raw["layers"][1]["layer"] = 99
    with pytest.raises(SpecError, match=r"layer ids\[1\]: 99 is not a decoder layer of model 'tiny'"):
        check_plan(msgspec.convert(raw, Plan))
