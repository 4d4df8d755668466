"""Fused MoE (DESIGN 3.2): routing, typed wrappers, fake impls and autograd.

Shapes: T tokens, D model dim, F expert FFN dim, E experts, k experts per token.
Weights in the transformers 5 / vLLM layout: w_gate_up [E, 2F, D] (rows 0..F-1
gate, F..2F-1 up), w_down [E, D, F].
"""

from __future__ import annotations

import torch

from m1ops._layout import dense, unit_rows


def moe_route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniMax / Mixtral routing: softmax in fp32, top-k, renormalised.

        p = softmax(router_logits.float());  ids = the k largest p (ties: lower index first)
        weights = p[ids] / sum(p[ids])

    Args:
        router_logits: [T, E] any float dtype.
        top_k:         k, 1 <= k <= E.

    Returns:
        (topk_weights [T, k] float32, topk_ids [T, k] int64), each row in
        descending weight order. Differentiable with respect to router_logits
        through topk_weights (ids are integers).
    """
    if router_logits.dim() != 2:
        raise ValueError(f"moe_route: 'router_logits' must be 2-D [T, E], got shape {list(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"moe_route: top_k must be in [1, E] = [1, {num_experts}], got {top_k}")
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    # torch.topk does not say which of equal values it returns; a stable
    # descending sort keeps equal probabilities in index order, so ties go to
    # the lower expert index, on every device.
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    topk_ids = order[:, :top_k].contiguous()
    topk = probs.gather(1, topk_ids)
    topk_weights = topk / topk.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The routed experts of a MoE block, fused (no per-expert Python loop).

        y_t = sum_j w_tj W_down[e] (silu(W_gate[e] x_t) * (W_up[e] x_t)),   e = topk_ids[t, j]

    Args:
        x:            [T, D]      float32, bfloat16, float16 (float64 on CPU)
        w_gate_up:    [E, 2F, D]  x's dtype; rows 0..F-1 gate, F..2F-1 up
        w_down:       [E, D, F]   x's dtype
        topk_weights: [T, k]      float32 (float64 with float64 x)
        topk_ids:     [T, k]      int64 or int32 in [0, E); an id outside that range
                                  raises a ValueError (never addresses memory)

    Any strides: x with unit-stride rows and contiguous weights pass without a
    copy, other layouts are copied first.

    Returns:
        y: [T, D] in x's dtype; per-expert products and the sum over k in fp32.

    Differentiable with respect to x, w_gate_up, w_down and topk_weights.
    Memory: for the backward the forward keeps its [T * k, 2F] gate/up
    pre-activations (x's dtype, expert-sorted rows), which saves the backward
    a third GEMM (2 of its 8 units of work; bench/bench_moe.py measures the
    trade); the expert permutation and silu(gate) * up are recomputed
    (O(T * k) and elementwise). Without gradients nothing is kept.

    Scratch: the CPU kernels take their large buffers (about 4 T k (2D + F)
    bytes forward and up to 4 T k (5D + 6F) backward: 1.9 GB at T k = 32K,
    D = 1024, F = 1536) from arenas that are reused across calls and kept by
    the process, because first-touching fresh pages costs a noticeable share
    of a call; CUDA uses torch's caching allocator.

    CPU kernels: on CPUs with AVX-512 (and AVX512-BF16 for bfloat16) the
    products run on m1's own AVX-512 kernels; elsewhere on fp32 tiles through
    the BLAS sgemm of torch. bfloat16 on the AVX512-BF16 path rounds the
    intermediate activations to bfloat16 as any bf16 MLP does. On CUDA
    the op synchronises its stream once per call: it reads the per-expert
    token counts back to size the grouped GEMMs (and learns of bad ids).
    The environment variable M1_MOE_GATE_UP (read on every call) picks the
    CUDA gate/up step: 'fused' (one grouped dual GEMM with SiLU * up in its
    epilogue), 'unfused' (CUTLASS grouped GEMM, then an elementwise pass) or
    'auto' (default: unfused for bf16/fp16 on sm_90 and newer, where it
    measured faster, fused otherwise). Both agree to rounding.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, w_gate_up, w_down, topk_weights)
    )
    y, _ = torch.ops.m1.fused_moe(
        unit_rows(x), dense(w_gate_up), dense(w_down), dense(topk_weights), dense(topk_ids), save_gate_up=needs_grad
    )
    return y


def fused_moe_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of fused_moe: (grad_x, grad_w_gate_up, grad_w_down, grad_topk_weights).

    grad_y is [T, D] in x's dtype; the other arguments are fused_moe's.
    gate_up is the [T * k, 2F] pre-activations torch.ops.m1.fused_moe returns
    with save_gate_up=True, or None to recompute them. Gradients come back in
    the dtype of their input (topk_weights' for grad_topk_weights), computed
    in fp32. autograd calls this; it is public for custom training loops.
    """
    return torch.ops.m1.fused_moe_backward(
        unit_rows(grad_y), unit_rows(x), dense(w_gate_up), dense(w_down), dense(topk_weights), dense(topk_ids),
        dense(gate_up),
    )


@torch.library.register_fake("m1::fused_moe")
def _fused_moe_fake(x, w_gate_up, w_down, topk_weights, topk_ids, *, save_gate_up=False):
    T, k = topk_ids.shape
    y = x.new_empty(x.shape)
    gate_up = x.new_empty((T * k if save_gate_up else 0, w_gate_up.shape[1]))
    return y, gate_up


@torch.library.register_fake("m1::fused_moe_backward")
def _fused_moe_backward_fake(grad_y, x, w_gate_up, w_down, topk_weights, topk_ids, gate_up):
    return (
        x.new_empty(x.shape),
        w_gate_up.new_empty(w_gate_up.shape),
        w_down.new_empty(w_down.shape),
        topk_weights.new_empty(topk_weights.shape),
    )


def _fused_moe_setup_context(ctx, inputs, keyword_only_inputs, output):
    x, w_gate_up, w_down, topk_weights, topk_ids = inputs
    _, gate_up = output
    saved = gate_up if keyword_only_inputs.get("save_gate_up", False) else None
    ctx.save_for_backward(x, w_gate_up, w_down, topk_weights, topk_ids, saved)
    ctx.mark_non_differentiable(gate_up)


def _fused_moe_backward(ctx, grad_y, _grad_gate_up):
    x, w_gate_up, w_down, topk_weights, topk_ids, gate_up = ctx.saved_tensors
    grads = torch.ops.m1.fused_moe_backward(grad_y, x, w_gate_up, w_down, topk_weights, topk_ids, gate_up)
    return (*grads, None)


torch.library.register_autograd(
    "m1::fused_moe", _fused_moe_backward, setup_context=_fused_moe_setup_context
)
