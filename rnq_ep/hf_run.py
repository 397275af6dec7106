"""`rnq-ep run --hf`: greedy generation on a converted transformers model, and the prompts every rank cuts.

Split from `rnq_ep.hf` (loading, layouts, conversion): this part runs a converted model; the Ray
driver uses `prompt_rows` to cut prompts without loading any weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rnq_ep.hf import TINY_PREFIX, TOKENIZER_FILES, EPExperts, convert, load_model, model_folder, tiny_config
from rnq_ep.specs import Plan, SpecError
from rnq_ep.textdata import builtin_text, token_batches, tokenize


@dataclass(frozen=True)
class GenerationReport:
    """Greedy generation on a converted model: tokens, speed and per-layer balance of this rank."""

    tokens: torch.Tensor  # [B, S + N] prompt followed by the generated ids
    seconds: float
    tokens_per_s: float  # generated tokens (B x N) per second of the whole call, prefill included
    balancedness: list[float]  # [L] max/mean GPU load per MoE layer, averaged over forward steps


def generate_greedy(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> GenerationReport:
    """Exactly `new_tokens` greedy steps from prompt [B, S] (every rank runs the same steps, EOS or not)."""
    converted = [module for module in model.modules() if isinstance(module, EPExperts)]
    if not converted:
        raise SpecError("generate_greedy: the model has no EP layers, call convert() first")
    steps: list[list[float]] = [[] for _ in converted]
    handles = [
        module.register_forward_hook(lambda m, args, out, seen=seen: seen.append(m.ep_layer.last_stats.balancedness))
        for module, seen in zip(converted, steps)
    ]
    started = time.perf_counter()
    try:
        with torch.no_grad():
            tokens = model.generate(
                prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - started
    return GenerationReport(
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=prompt.shape[0] * new_tokens / seconds,
        balancedness=[sum(seen) / len(seen) for seen in steps],
    )


def prompt_rows(source: str, rows: int, prompt_len: int) -> torch.Tensor:
    """Prompts [rows, S] from the builtin text, cut as run_on_rank's ranks take them (rank r: rows r*B..(r+1)*B);
    reads the config and tokenizer only (the driver needs no weights)."""
    if source.startswith(TINY_PREFIX):
        return _builtin_prompts(tiny_config(source[len(TINY_PREFIX):]).vocab_size, None, rows, prompt_len)
    folder = model_folder(source)
    from transformers import AutoConfig, AutoTokenizer

    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    return _builtin_prompts(AutoConfig.from_pretrained(folder).vocab_size, tokenizer, rows, prompt_len)


def _builtin_prompts(vocab_size: int, tokenizer: Any | None, rows: int, prompt_len: int) -> torch.Tensor:
    """The first [rows, S] batch of the builtin text's tokens."""
    ids = tokenize(builtin_text(), vocab_size, tokenizer)
    return token_batches(ids, rows, prompt_len, rows * prompt_len)[0]


def run_on_rank(
    source: str, plan: Plan, rank: int, world_size: int, group: Any = None, batch: int = 1, prompt_len: int = 32,
    new_tokens: int = 16, seed: int = 0, policy: str = "least-loaded", device: torch.device | None = None,
    backend: str = "auto", prompt: torch.Tensor | None = None,
) -> GenerationReport:
    """`rnq-ep run --hf`: load `source`, convert for this rank, greedy-generate from `prompt` [B, S] (default: this
    rank's rows of the builtin text)."""
    model, tokenizer, _ = load_model(source, seed)
    device = device or torch.device("cpu")
    convert(model.to(device), plan, rank, world_size, group, policy, backend)
    if prompt is None:
        rows = _builtin_prompts(model.config.vocab_size, tokenizer, batch * world_size, prompt_len)  # [R*B, S]
        prompt = rows[rank * batch : (rank + 1) * batch]
    if dist.is_initialized():
        dist.barrier(group)  # start every rank's clock together: a slower load elsewhere is not generation time
    return generate_greedy(model, prompt.to(device), new_tokens)
