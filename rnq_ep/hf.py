"""transformers MoE models: family table, tiny random-weight builders, loading, expert access.

transformers 5.x stores the routed experts of a layer as one module with fused 3-D weights
(`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]); GPT-OSS stores them transposed
([E, H, 2I], [E, I, H]) with biases and interleaved gate/up columns. Every experts module is
called as `experts(hidden_states[T, H], top_k_index[T, k], top_k_weights[T, k])`, which is the
seam calibration hooks and conversion replace. `canonical_weights` hides the layout difference:
it always returns [N, K] (output channels, input features) matrices; `ep_weights` also puts the
gate rows before the up rows, the layout rnq-ep's experts use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rnq_ep.layer import EPMoE
from rnq_ep.specs import ModelSpec, Plan, SpecError

TINY_PREFIX = "tiny-"
_COMMON = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
)
# family -> (transformers model_type, config overrides): 3 layers, hidden 64, 8-16 experts
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2-moe": ("qwen2_moe", dict(
        intermediate_size=128, moe_intermediate_size=96, shared_expert_intermediate_size=128,
        num_experts=8, num_experts_per_tok=2)),
    "qwen3-moe": ("qwen3_moe", dict(
        intermediate_size=128, moe_intermediate_size=96, num_experts=16, num_experts_per_tok=4, head_dim=16)),
    "olmoe": ("olmoe", dict(intermediate_size=96, num_experts=16, num_experts_per_tok=4)),
    "deepseek-v3": ("deepseek_v3", dict(
        num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=96, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16)),
    "gpt-oss": ("gpt_oss", dict(
        intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=64,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    "phimoe": ("phimoe", dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)),
}
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tiny_config(family: str) -> Any:
    """The transformers config of `tiny-<family>` (no weights)."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise SpecError(f"unknown model family {family!r}, expected one of {sorted(FAMILIES)}")
    model_type, overrides = FAMILIES[family]
    return AutoConfig.for_model(model_type, **{**_COMMON, **overrides})


def tiny_model(family: str, seed: int = 0) -> nn.Module:
    """A small random-weight causal LM of `family` (fp32 holding bf16-exact values, eval mode); seeded."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # bf16-exact values, like a bf16 checkpoint loaded in fp32
        for experts in model.modules():
            if is_experts_module(experts) and getattr(experts, "has_bias", False):  # zero-initialised: draw them
                experts.gate_up_proj_bias.normal_(std=0.1)
                experts.down_proj_bias.normal_(std=0.1)
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16))
    return model


def load_model(source: str, seed: int = 0) -> tuple[nn.Module, Any | None, str]:
    """(model in eval mode, tokenizer or None, name) from `tiny-<family>` or a save_pretrained folder."""
    if source.startswith(TINY_PREFIX):
        return tiny_model(source[len(TINY_PREFIX):], seed), None, source
    folder = model_folder(source)
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_FILES):
        raise SpecError(
            f"{folder}: no weights (*.safetensors or pytorch_model*.bin), expected a save_pretrained folder"
        )
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model, loading = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", output_loading_info=True)
        has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError(f"{folder}: transformers cannot load it: {first_line}") from None
    missing = sorted(loading.get("missing_keys", ()))
    if missing:  # transformers would run them with random weights
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SpecError(f"{folder}: the weight files lack {len(missing)} tensor(s) of the model: {shown}")
    return model.eval(), tokenizer, folder.name


def model_folder(source: str) -> Path:
    """`source` as a save_pretrained folder with a config.json, or a SpecError saying what it is not."""
    folder = Path(source)
    if not folder.is_dir():
        raise SpecError(
            f"model {source!r}: no such folder, expected a save_pretrained folder or "
            f"{TINY_PREFIX}<family> with family one of {sorted(FAMILIES)}"
        )
    if not (folder / "config.json").is_file():
        raise SpecError(f"{folder}: no config.json, expected a save_pretrained folder")
    return folder


def is_experts_module(module: nn.Module) -> bool:
    """True for a transformers 5.x fused experts module (3-D gate_up_proj and down_proj)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3


def moe_layers(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(decoder layer id, module name, experts module) of every MoE layer, in model order."""
    found = []
    for name, module in model.named_modules():
        if is_experts_module(module):
            match = re.search(r"layers\.(\d+)\.", name)
            found.append((int(match.group(1)) if match else len(found), name, module))
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise SpecError(
            f"not a MoE model (model_type={model_type!r}): no experts module with fused "
            "gate_up_proj/down_proj weights found"
        )
    return found


def expert_activation(experts: nn.Module) -> str | None:
    """The rnq-ep activation the experts compute: "silu" (SwiGLU), "swiglu-oai" (GPT-OSS), None for anything else."""
    from transformers.integrations.moe import _default_apply_gate
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from rnq_ep.kernels.reference import SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT

    if getattr(experts, "has_post_expert_norm", False) or not getattr(experts, "has_gate", True):
        return None
    apply_gate = type(experts)._apply_gate
    hidden_act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if apply_gate is _default_apply_gate and hidden_act in ("silu", "swish"):
        return "silu"
    oai_constants = (getattr(experts, "alpha", None), getattr(experts, "limit", None)) == (
        SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT)
    if apply_gate is GptOssExperts._apply_gate and oai_constants:
        return "swiglu-oai"
    return None


def ep_weights(
    experts: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(w_gate_up [E, 2I, H] gate rows then up rows, w_down [E, H, I], gate_up_bias [E, 2I] | None, down_bias [E, H] | None).

    Views of the stored tensors for the plain layout; GPT-OSS's transposed, interleaved ones are
    rearranged into new tensors.
    """
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    has_bias = getattr(experts, "has_bias", False)
    gate_up_bias = experts.gate_up_proj_bias.detach() if has_bias else None
    down_bias = experts.down_proj_bias.detach() if has_bias else None
    if not getattr(experts, "is_concatenated", True):  # [g0, u0, g1, u1, ...] -> [g0, g1, ..., u0, u1, ...]
        gate_up = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        if gate_up_bias is not None:
            gate_up_bias = torch.cat([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], dim=1)
    return gate_up.contiguous(), down.contiguous(), gate_up_bias, down_bias


def canonical_weights(experts: nn.Module, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `expert`'s (gate_up [2I, H], down [H, I]) as [N, K] views, whatever the storage layout."""
    gate_up, down = experts.gate_up_proj[expert], experts.down_proj[expert]
    if getattr(experts, "is_transposed", False):
        return gate_up.t(), down.t()  # GPT-OSS: [H, 2I] -> [2I, H], [I, H] -> [H, I]
    return gate_up, down


def expert_forward(
    experts: nn.Module, expert: int, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """f_e(x) [T, H] for rows x [T, H] with weights gate_up [2I, H], down [H, I], in their dtype."""
    x = x.to(gate_up.dtype)
    hidden = nn.functional.linear(x, gate_up)  # [T, 2I]
    if getattr(experts, "has_bias", False):
        hidden = hidden + experts.gate_up_proj_bias[expert].to(hidden.dtype)
    hidden = experts._apply_gate(hidden)  # the family's own gating (GPT-OSS: interleaved, clamped)
    out = nn.functional.linear(hidden, down)  # [T, H]
    if getattr(experts, "has_bias", False):
        out = out + experts.down_proj_bias[expert].to(out.dtype)
    return out


def model_spec(model: nn.Module, name: str) -> ModelSpec:
    """The ModelSpec (MoE shape) of a transformers MoE model."""
    layers = moe_layers(model)
    experts = layers[0][2]
    gate_up, down = canonical_weights(experts, 0)
    config = model.config
    has_qwen_shared = bool(getattr(config, "shared_expert_intermediate_size", 0))
    shared = getattr(config, "n_shared_experts", None) or int(has_qwen_shared)
    return ModelSpec(
        name=name,
        num_layers=len(layers),
        num_experts=experts.gate_up_proj.shape[0],
        top_k=int(config.num_experts_per_tok),
        hidden_size=down.shape[0],
        moe_intermediate_size=gate_up.shape[0] // 2,
        num_shared_experts=int(shared),
        activation=expert_activation(experts) or str(getattr(config, "hidden_act", "silu")),
        source=f"transformers {config.model_type}",
    )


class EPExperts(nn.Module):
    """Drop-in for a transformers experts module that runs the routed experts through an EPMoE."""

    def __init__(self, ep_layer: EPMoE):
        super().__init__()
        self.ep_layer = ep_layer

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, k] (the model's router) -> [T, H]."""
        return self.ep_layer.forward_routed(hidden_states, top_k_index, top_k_weights).to(hidden_states.dtype)


def _router_of(block: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The block's own router as x [T, H] -> (ids [T, k], weights [T, k]) (routers return logits, weights, ids)."""
    router = getattr(block, "gate", None) or getattr(block, "router")

    def route(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, weights, ids = router(x)
        return ids, weights

    return route


def convert(
    model: nn.Module, plan: Plan, rank: int, world_size: int, group: Any = None, policy: str = "least-loaded",
    backend: str = "auto",
) -> nn.Module:
    """Replace every MoE layer's experts with this rank's EPMoE copies (in place); router and shared experts stay."""
    spec = model_spec(model, plan.model.name)
    _check_plan_fits(model, spec, plan, world_size)
    if group is None and world_size > 1:
        group = dist.group.WORLD
    by_layer = {layer_plan.layer: layer_plan for layer_plan in plan.layers}
    for layer_id, name, experts in moe_layers(model):
        block_name, _, attribute = name.rpartition(".")
        block = model.get_submodule(block_name)
        w_gate_up, w_down, gate_up_bias, down_bias = ep_weights(experts)  # EPMoE slices and quantizes its copies
        ep_layer = EPMoE(plan.model, by_layer[layer_id], world_size, rank, group, w_gate_up, w_down,
                         _router_of(block), policy=policy, backend=backend, activation=spec.activation,
                         gate_up_bias=gate_up_bias, down_bias=down_bias)
        setattr(block, attribute, EPExperts(ep_layer))
    return model


def _check_plan_fits(model: nn.Module, spec: ModelSpec, plan: Plan, world_size: int) -> None:
    """Raise SpecError unless `plan` was made for this model's MoE shape, its layers and world_size GPUs."""
    for key in ("num_experts", "top_k", "hidden_size", "moe_intermediate_size"):
        if getattr(plan.model, key) != getattr(spec, key):
            planned, actual = getattr(plan.model, key), getattr(spec, key)
            raise SpecError(f"plan: model {key}={planned} but the transformers model has {actual}")
    if plan.cluster.num_gpus != world_size:
        raise SpecError(f"plan: made for {plan.cluster.num_gpus} GPUs, but world size is {world_size}")
    if expert_activation(moe_layers(model)[0][2]) is None:
        raise SpecError(
            f"{model.config.model_type}: its experts compute neither SwiGLU nor GPT-OSS's clamped SwiGLU "
            "(custom gating or a post-expert norm), so this family can be calibrated but not converted"
        )
    missing = sorted({layer_id for layer_id, _, _ in moe_layers(model)} - {lp.layer for lp in plan.layers})
    if missing:
        raise SpecError(f"plan: no layer plan for MoE layers {missing} of the model")
