"""Lightning attention ops (DESIGN 3.1): typed wrappers and fake impls.

Shapes: B batch, H heads, K key/query head dim, V value head dim.
Decay: head h multiplies its [K, V] state by lambda_h = exp(-slope_h) per token.
"""

from __future__ import annotations

import torch


def lightning_attn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """One decode step of lightning attention; updates `state` in place.

        state <- exp(-slope_h) * state + k^T v
        o      = scale * q @ state            (the updated state)

    Args:
        q:     [B, H, K]  float32, bfloat16, float16 (float64 on CPU)
        k:     [B, H, K]  q's dtype
        v:     [B, H, V]  q's dtype
        slope: [H]        float32 decay rates (>= 0)
        state: [B, H, K, V] float32 (float64 accepted with float64 inputs), contiguous;
               read and overwritten.
        scale: MiniMax uses 1.0 (no 1/sqrt(K)).

    q, k, v may be strided views (e.g. slices of a fused qkv projection) as
    long as their last dimension is contiguous.

    Returns:
        o: [B, H, V] in v's dtype.

    Inference only: there is no backward (use m1ops.lightning_attn for training).
    """
    return torch.ops.m1.lightning_attn_decode(q, k, v, slope, state, scale=scale)


@torch.library.register_fake("m1::lightning_attn_decode")
def _lightning_attn_decode_fake(q, k, v, slope, state, *, scale=1.0):
    return torch.empty_like(v, memory_format=torch.contiguous_format)
