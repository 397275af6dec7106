"""Triton grouped SwiGLU kernels over expert copies (bf16, int8, int4) and their torch oracles."""

from rnq_ep.kernels.grouped_swiglu import grouped_swiglu
from rnq_ep.kernels.reference import grouped_swiglu_reference

__all__ = ["grouped_swiglu", "grouped_swiglu_reference"]
