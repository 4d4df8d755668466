"""Readable pure-PyTorch references of every m1 op, written from the math.

Tests compare the kernels against these in float64; benchmarks time them.
`m1ops.reference.torch_ops` holds the same ops with exactly the m1ops
signatures in fp32 (m1model's reference path).
"""

from m1ops.reference.lightning import (
    lightning_attn_decode_ref,
    lightning_attn_recurrent_ref,
    lightning_attn_ref,
)
from m1ops.reference.moe import fused_moe_loop_ref, fused_moe_ref, moe_route_ref
from m1ops.reference.logits import fp32_logits_ref, fp32_logprobs_ref
from m1ops.reference.norm import rms_norm_ref

__all__ = [
    "lightning_attn_decode_ref",
    "lightning_attn_recurrent_ref",
    "lightning_attn_ref",
    "fused_moe_loop_ref",
    "fused_moe_ref",
    "moe_route_ref",
    "fp32_logprobs_ref",
    "fp32_logits_ref",
    "rms_norm_ref",
]
