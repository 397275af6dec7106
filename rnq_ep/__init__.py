"""rnq-ep: expert-parallel MoE inference with Replicate-and-Quantize load balancing."""

__version__ = "0.1.0"
