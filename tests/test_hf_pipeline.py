"""The whole path on every family: calibrate a tiny model, plan from its stats, convert on two gloo ranks, compare."""

from __future__ import annotations

import copy
from typing import NamedTuple

import msgspec
import pytest
import torch

from tiny_hf import one_torch_thread  # noqa: F401  (fixture; the import skips without transformers)
from test_hf_convert import ONE_CPU, builtin_batch, logits
from rnq_ep import hf
from rnq_ep.specs import Plan, PlanOptions
from rnq_ep.textdata import builtin_text, token_batches, tokenize

FAMILIES = sorted(hf.FAMILIES)
TWO_CPUS = msgspec.structs.replace(ONE_CPU, name="two-cpus", gpus_per_node=2)
CALIBRATION_ROWS, EVAL_ROWS, SEQ_LEN = 8, 4, 128  # per rank: EVAL_ROWS rows after the calibration text


def calibrated_plans(family: str) -> dict[str, Plan]:
    """Plain EP and R&Q (bf16+int8, bf16+int4) plans for two GPUs from tiny-<family>'s calibration stats."""
    from rnq_ep.calibration import calibrate
    from rnq_ep.planner import plan_plain_ep, plan_rnq

    model = hf.tiny_model(family)
    ids = tokenize(builtin_text(), model.config.vocab_size)
    stats = calibrate(model, token_batches(ids, 4, SEQ_LEN, CALIBRATION_ROWS * SEQ_LEN))
    spec = hf.model_spec(model, f"tiny-{family}")
    plans = {"plain EP": plan_plain_ep(spec, TWO_CPUS, stats)}
    for fmt in ("int8", "int4"):
        plans[f"R&Q {fmt}"] = plan_rnq(spec, TWO_CPUS, stats, PlanOptions(formats=("bf16", fmt)))
    return plans


def holds_only_its_copies(model: torch.nn.Module, plan: Plan, rank: int) -> bool:
    """True when every converted layer stores exactly the (expert, format) copies the plan puts on `rank`."""
    layers = [module.ep_layer.experts for module in model.modules() if isinstance(module, hf.EPExperts)]
    for experts, layer_plan in zip(layers, plan.layers, strict=True):
        planned = sorted((slot.expert, slot.fmt) for slot in layer_plan.slots if slot.gpu == rank)
        held = sorted((int(experts.experts[int(c)]), group.fmt) for group in experts.groups for c in group.copies)
        stored = sum(group.stored_gate_up.shape[0] for group in experts.groups)  # [G, 2I, H] per format group
        if held != planned or stored != len(planned):
            return False
    return True


class RankResult(NamedTuple):
    """One rank's comparison of a converted model with the original."""

    max_diff: float  # max |logit difference| on this rank's rows
    matches: int  # top-1 tokens equal to the original's
    tokens: int
    only_its_copies: bool  # see holds_only_its_copies


class Comparison(NamedTuple):
    """Both ranks' comparison of one plan of one family."""

    max_diff: float
    agreement: float  # top-1 agreement with the original
    quantized: float  # fraction of the plan's copies not in bf16
    only_its_copies: bool  # on every rank


def compare_on_rank(rank: int, world_size: int, plans: dict[str, dict[str, Plan]]) -> dict[str, dict[str, RankResult]]:
    """family -> plan name -> this rank's RankResult, converted vs original on its own builtin rows."""
    torch.set_num_threads(1)
    results = {}
    for family, by_name in plans.items():
        model = hf.tiny_model(family)
        batch = builtin_batch(EVAL_ROWS, SEQ_LEN, offset=CALIBRATION_ROWS + rank * EVAL_ROWS)  # [R, S]
        reference = logits(model, batch)  # [R, S, V]
        results[family] = {}
        for name, plan in by_name.items():
            converted = hf.convert(copy.deepcopy(model), plan, rank, world_size)
            got = logits(converted, batch)
            results[family][name] = RankResult(
                float((got - reference).abs().max()), int((got.argmax(-1) == reference.argmax(-1)).sum()),
                batch.numel(), holds_only_its_copies(converted, plan, rank),
            )
    return results


def measure(families: list[str]) -> dict[str, dict[str, Comparison]]:
    """family -> plan name -> Comparison, with tiny-<family>'s calibrated plans converted on two gloo ranks."""
    from gloo import run_ranks

    plans = {family: calibrated_plans(family) for family in families}
    ranks = run_ranks(compare_on_rank, 2, plans, timeout=600)
    table = {}
    for family, by_name in plans.items():
        table[family] = {}
        for name, plan in by_name.items():
            mine = [r[family][name] for r in ranks]
            slots = [slot for layer in plan.layers for slot in layer.slots]
            table[family][name] = Comparison(
                max(r.max_diff for r in mine), sum(r.matches for r in mine) / sum(r.tokens for r in mine),
                sum(slot.fmt != "bf16" for slot in slots) / len(slots), all(r.only_its_copies for r in mine),
            )
    return table


@pytest.mark.slow
def test_every_family_calibrated_planned_and_converted_on_two_ranks_follows_the_original():
    for family, by_name in measure(FAMILIES).items():
        assert all(c.only_its_copies for c in by_name.values()), (family, by_name)
        assert by_name["plain EP"].max_diff <= 1e-5, (family, by_name)
        assert by_name["R&Q int8"].quantized > 0 and by_name["R&Q int4"].quantized > 0, (family, by_name)
        assert by_name["R&Q int8"].agreement >= 0.99, (family, by_name)
