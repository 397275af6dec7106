"""Shared by the transformers tests: skip without transformers, one torch thread, cached tiny models."""

from __future__ import annotations

import pytest
import torch

from rnq_ep import hf

pytest.importorskip("transformers", reason="the hf extra (transformers>=5) is not installed")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run ~20x faster on one thread when the test machine's cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """One tiny model per family, built once for this module."""
    cache: dict[str, torch.nn.Module] = {}

    def build(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = hf.tiny_model(family)
        return cache[family]

    return build
