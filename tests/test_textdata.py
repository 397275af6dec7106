"""Calibration text: builtin corpus, file readers, byte fallback tokenizer, batching."""

from __future__ import annotations

import json

import pytest
import torch

from rnq_ep.specs import SpecError
from rnq_ep.textdata import builtin_text, load_text, read_text, token_batches, tokenize


def test_builtin_text_is_the_python_help_topics():
    text = load_text("builtin")
    assert len(text) > 100_000
    assert "assert statement" in text.lower()
    assert text == builtin_text()


def test_plain_text_file_is_read_as_is(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello\nworld\n")
    assert read_text(path) == "hello\nworld\n"


def test_jsonl_text_fields_are_joined(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    assert read_text(path) == "first\n\nsecond"


def test_jsonl_record_without_text_names_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no"}) + "\n")
    with pytest.raises(SpecError, match=r"docs.jsonl:2: expected an object with a string 'text' field"):
        read_text(path)


def test_empty_data_file_is_rejected(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n")
    with pytest.raises(SpecError, match="empty.txt: data file has no text"):
        load_text(str(path))


def test_missing_data_file_is_rejected(tmp_path):
    with pytest.raises(SpecError, match="no such data file"):
        load_text(str(tmp_path / "absent.txt"))


def test_byte_fallback_ids_are_utf8_bytes_mod_vocab():
    ids = tokenize("aé", vocab_size=100)
    assert ids.tolist() == [b % 100 for b in "aé".encode()]


def test_token_batches_are_consecutive_and_stop_at_max_tokens():
    ids = torch.arange(1000)
    batches = token_batches(ids, batch=3, seq_len=10, max_tokens=95)
    assert [tuple(b.shape) for b in batches] == [(3, 10), (3, 10), (3, 10)]
    assert torch.equal(torch.cat(batches).flatten(), torch.arange(90))


def test_short_text_becomes_one_shorter_sequence():
    batches = token_batches(torch.arange(5), batch=4, seq_len=16, max_tokens=100)
    assert [b.tolist() for b in batches] == [[[0, 1, 2, 3, 4]]]
