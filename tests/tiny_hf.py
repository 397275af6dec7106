"""Shared by the transformers tests: skip without transformers, run tiny models on one thread."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers>=5) is not installed")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run ~20x faster on one thread when the test machine's cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
