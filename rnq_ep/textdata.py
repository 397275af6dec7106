"""Calibration text: the builtin corpus, plain-text / JSONL files, tokenization and token batches.

`builtin` is the English text of Python's own help topics (`pydoc_data.topics`), so calibration
runs on any install with no download. Without a tokenizer the byte-level fallback maps every
UTF-8 byte b to token id `b % vocab_size`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rnq_ep.specs import SpecError

BUILTIN = "builtin"


def builtin_text() -> str:
    """All `pydoc_data.topics` help texts (~465k characters of English), joined in key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: str | Path) -> str:
    """Text of a plain-text file, or the `text` fields of a JSONL file (`.jsonl`), joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such data file, expected plain text, JSONL with a 'text' field, or 'builtin'")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        raw = "\n\n".join(_jsonl_texts(path, raw))
    if not raw.strip():
        raise SpecError(f"{path}: data file has no text, expected plain text or JSONL with a 'text' field")
    return raw


def _jsonl_texts(path: Path, raw: str) -> Iterator[str]:
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpecError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SpecError(f"{path}:{number}: expected an object with a string 'text' field")
        yield record["text"]


def load_text(source: str) -> str:
    """`builtin` or a file path (see read_text)."""
    return builtin_text() if source == BUILTIN else read_text(source)


def tokenize(text: str, vocab_size: int, tokenizer: Any | None = None) -> torch.Tensor:
    """Token ids [N] (int64): the model's tokenizer when given, else UTF-8 bytes mod vocab_size."""
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64)
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    return data.to(torch.int64) % vocab_size


def token_batches(ids: torch.Tensor, batch: int, seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Consecutive [B, S] batches of `ids` (last one may have fewer rows), at most max_tokens in all."""
    if batch < 1 or seq_len < 2 or max_tokens < 2:
        raise SpecError(f"need batch >= 1, seq_len >= 2, tokens >= 2; got {batch}, {seq_len}, {max_tokens}")
    if ids.numel() < 2:
        raise SpecError(f"calibration text has {ids.numel()} token(s), expected at least 2")
    seq_len = min(seq_len, ids.numel(), max_tokens)
    rows = min(ids.numel(), max_tokens) // seq_len
    sequences = ids[: rows * seq_len].view(rows, seq_len)  # [rows, S]
    return list(sequences.split(batch))
