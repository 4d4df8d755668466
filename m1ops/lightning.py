"""Lightning attention ops (DESIGN 3.1): typed wrappers, fake impls, autograd.

Shapes: B batch, T tokens, H heads, K key/query head dim, V value head dim,
N independent sequences (N = B, or the number of cu_seqlens segments).
Decay: head h multiplies its [K, V] state by lambda_h = exp(-slope_h) per token.
"""

from __future__ import annotations

import functools

import torch

from m1ops._layout import dense, unit_rows


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

    q, k, v may be any strided views: slices of a fused qkv projection (unit
    stride in the last dimension) pass without a copy, other layouts are copied.

    Returns:
        o: [B, H, V] in v's dtype.

    Inference only: there is no backward (use m1ops.lightning_attn for training).
    """
    q, k, v = unit_rows(q), unit_rows(k), unit_rows(v)
    return torch.ops.m1.lightning_attn_decode(q, k, v, dense(slope), state, scale=scale)


@torch.library.register_fake("m1::lightning_attn_decode")
def _lightning_attn_decode_fake(q, k, v, slope, state, *, scale=1.0):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


# Tokens per block when block_size is None (the kernels' defaults): 64 on the
# CPU (the fastest measured with bench/bench_lightning.py: the per-token cost is
# 2 * block * (K + V) + 4 * K * V flops, and BLAS stays efficient on 64-row
# tiles) and 64 on CUDA (the kernels' MMA tile along T, which they run whatever is asked).
DEFAULT_BLOCK_SIZE = {"cpu": 64, "cuda": 64}


def lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Lightning attention over whole sequences (prefill / training), blockwise.

    For each sequence and head, with lambda = exp(-slope_h) and S_0 = initial_state:

        S_t = lambda * S_{t-1} + k_t^T v_t          o_t = scale * q_t S_t

    computed block by block (intra-block (Q K^T * decay mask) V, inter-block
    through the fp32 state), differentiable in q, k, v and initial_state.

    Args:
        q:     [B, T, H, K]  float32, bfloat16, float16 (float64 on CPU)
        k:     [B, T, H, K]  q's dtype
        v:     [B, T, H, V]  q's dtype
        slope: [H]           float32 decay rates (>= 0; no gradient)
        scale: MiniMax uses 1.0 (no 1/sqrt(K)).
        initial_state: [N, H, K, V] float32 (float64 accepted with float64 inputs) or None (zeros).
        output_final_state: return S_T of every sequence.
        cu_seqlens: [N + 1] int32/int64 offsets of N sequences packed along T (B == 1):
            cu[0] = 0, non-decreasing, cu[N] = T; empty segments are legal.
        block_size: tokens per block (a speed knob: results agree across sizes to
            rounding). None = DEFAULT_BLOCK_SIZE of the device; 1..4096 is accepted
            everywhere; the CUDA kernels always run their 64-token MMA tile.

    q, k, v may be any strided views: slices of a fused qkv projection (unit
    stride in the last dimension) pass without a copy, other layouts are copied. Head dims: CPU any K, V <= 256;
    CUDA K = V in {64, 128}.

    Returns:
        o:           [B, T, H, V] in v's dtype.
        final_state: [N, H, K, V] float32 (float64 for float64 inputs), or None
                     unless output_final_state. Feeds m1ops.lightning_attn_decode.
    """
    if slope.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "m1ops.lightning_attn: no gradient with respect to 'slope' is implemented; pass slope.detach()"
        )
    o, final_state = torch.ops.m1._lightning_attn_fwd(
        unit_rows(q), unit_rows(k), unit_rows(v), dense(slope), dense(initial_state), dense(cu_seqlens),
        scale=scale, block_size=block_size,
    )
    return o, (final_state if output_final_state else None)


def kernel_takes(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether lightning_attn has a kernel for q's device and these head dims (K = q.shape[-1],
    V = v.shape[-1]): the CPU takes any K, V <= 256, the CUDA kernels K = V in
    build_info()["cuda_lightning_head_dims"] (64, 128). Callers with other shapes can run a PyTorch
    formulation (m1model does); the op itself raises a ValueError naming the dims."""
    K, V = q.shape[-1], v.shape[-1]
    max_dim, cuda_dims = _head_dim_rules()
    if q.device.type == "cpu":
        return K <= max_dim and V <= max_dim
    return q.device.type == "cuda" and K == V and K in cuda_dims


@functools.cache
def _head_dim_rules() -> tuple[int, frozenset[int]]:
    """(largest K, V on any device; K = V the CUDA kernels take), as the compiled op checks them."""
    from m1ops._build import build_info

    info = build_info()
    return info["lightning_max_head_dim"], frozenset(info["cuda_lightning_head_dims"])


def _state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _num_seqs(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.register_fake("m1::_lightning_attn_fwd")
def _lightning_attn_fwd_fake(q, k, v, slope, initial_state=None, cu_seqlens=None, *, scale=1.0, block_size=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = v.new_empty(B, T, H, V)
    final_state = q.new_empty(_num_seqs(q, cu_seqlens), H, K, V, dtype=_state_dtype(q))
    return o, final_state


@torch.library.register_fake("m1::_lightning_attn_bwd")
def _lightning_attn_bwd_fake(
    grad_o, grad_final_state, q, k, v, slope, initial_state=None, cu_seqlens=None, *, scale=1.0, block_size=None
):
    B, T, H, K = q.shape
    V = v.shape[-1]
    d_initial = q.new_empty(_num_seqs(q, cu_seqlens), H, K, V, dtype=_state_dtype(q))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_initial


def _fwd_setup_context(ctx, inputs, keyword_only_inputs, output):
    q, k, v, slope, initial_state, cu_seqlens = inputs
    ctx.save_for_backward(q, k, v, slope, initial_state, cu_seqlens)
    ctx.scale = keyword_only_inputs.get("scale", 1.0)
    ctx.block_size = keyword_only_inputs.get("block_size", None)


def _fwd_backward(ctx, grad_o, grad_final_state):
    q, k, v, slope, initial_state, cu_seqlens = ctx.saved_tensors
    if grad_o.stride(-1) != 1:  # the kernel reads rows with a contiguous last dim (autograd may expand zeros)
        grad_o = grad_o.clone(memory_format=torch.contiguous_format)
    dq, dk, dv, d_initial = torch.ops.m1._lightning_attn_bwd(
        grad_o, grad_final_state, q, k, v, slope, initial_state, cu_seqlens, scale=ctx.scale, block_size=ctx.block_size
    )
    d_initial = d_initial.to(initial_state.dtype) if initial_state is not None else None
    return dq, dk, dv, None, d_initial, None


torch.library.register_autograd("m1::_lightning_attn_fwd", _fwd_backward, setup_context=_fwd_setup_context)
