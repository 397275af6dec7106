"""Triton grouped SwiGLU kernels over expert copies (bf16, int8, int4) and their torch oracles.

Without CUDA, Triton can only run its CPU interpreter, which it reads from TRITON_INTERPRET when
triton is first imported; this package sets the variable (if unset) before any of its modules
imports triton, so the kernels run on CPU whichever module imports them first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rnq_ep.kernels.grouped_swiglu import grouped_swiglu  # noqa: E402
from rnq_ep.kernels.reference import grouped_swiglu_reference  # noqa: E402

__all__ = ["grouped_swiglu", "grouped_swiglu_reference"]
