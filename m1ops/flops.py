"""FLOP formulas of the m1 ops, registered with torch.utils.flop_counter.

    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode() as counter:
        loss = model(ids).sum(); loss.backward()     # m1 ops included
    counter.get_total_flops()

Importing m1ops registers every forward and backward op of the m1 namespace;
without a formula FlopCounterMode counts a custom op as 0 FLOPs.

Convention (torch's own, see its mm formula): a multiply-add is 2 FLOPs, so an
[m, k] x [k, n] product costs 2 m n k; only the products are counted, never the
elementwise work (decay masks, activations, exponentials, log-sum-exp), which
is below 1% of every op here at model shapes. The counts are those of the
algorithms the kernels run (the CPU kernels' comments name each product).

Shapes: B batch, T tokens, H heads, K key/query head dim, V value head dim,
D model dim, F expert FFN dim, k experts per token, N rows of the LM head,
Vocab vocabulary. bench/flops.py builds its analytic model from these same
functions, so the counter and the model share one definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from m1ops.lightning import DEFAULT_BLOCK_SIZE

# ----------------------------------------------------------------- lightning attention
#
# Blockwise prefill of one sequence and head, blocks of n <= C tokens (C = the
# block size, clamped to the sequence length as the kernels do), per block:
#   intra-block  A = (Q K^T) * decay mask          [n, K] x [K, n]   2 n^2 K
#                O = A V                           [n, n] x [n, V]   2 n^2 V
#   inter-block  O += (decayed Q) S                [n, K] x [K, V]   2 n K V
#   state update S = lambda^n S + (decayed K)^T V  [K, n] x [n, V]   2 n K V
# so a sequence of length L costs 2 (K + V) sum_blocks n^2 + 4 K V L: the
# per-token 2 C (K + V) + 4 K V of full blocks. (The kernels skip the
# inter-block product of a first block that starts from a zero state; the
# algorithm's count keeps it, as decode does: 4 K V per token either way.)


def _block_square_sum(length: int, block: int) -> int:
    """sum of n^2 over the blocks of one sequence of `length` tokens, blocks of `block` tokens."""
    if length <= 0:
        return 0
    bs = max(1, min(block, length))
    full, rest = divmod(length, bs)
    return full * bs * bs + rest * rest


def lightning_prefill_flops(seq_lens: Sequence[int], heads: int, dk: int, dv: int, block_size: int) -> int:
    """Forward of m1ops.lightning_attn over sequences of the given lengths."""
    squares = sum(_block_square_sum(int(n), block_size) for n in seq_lens)
    tokens = sum(int(n) for n in seq_lens)
    return heads * (2 * (dk + dv) * squares + 4 * dk * dv * tokens)


def lightning_prefill_backward_flops(seq_lens: Sequence[int], heads: int, dk: int, dv: int, block_size: int) -> int:
    """Backward (prefill_bwd_cpu.cpp), per block of n tokens:

    dq pass, the forward's pass on (dO, V, K) with the state recomputed:
        dO V^T 2 n^2 V, (.) K 2 n^2 K, dO S^T 2 n K V, state update 2 n K V
    dk/dv pass, blocks in reverse carrying R (the gradient into the state):
        Q K^T 2 n^2 K, dO V^T 2 n^2 V, dP^T Q 2 n^2 K, P^T dO 2 n^2 V,
        V R^T 2 n K V, K R 2 n K V, R update Q^T dO 2 n K V
    total 6 (K + V) n^2 + 10 K V n.
    """
    squares = sum(_block_square_sum(int(n), block_size) for n in seq_lens)
    tokens = sum(int(n) for n in seq_lens)
    return heads * (6 * (dk + dv) * squares + 10 * dk * dv * tokens)


def lightning_decode_flops(batch: int, heads: int, dk: int, dv: int) -> int:
    """One decode step: S = lambda S + k^T v (K V multiply-adds) and o = q S (K V multiply-adds)."""
    return batch * heads * 4 * dk * dv


def _seq_lens(q: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[int]:
    B, T = q.shape[0], q.shape[1]
    if cu_seqlens is None:
        return [T] * B
    if torch._subclasses.fake_tensor.is_fake(cu_seqlens):
        # Counting under FakeTensorMode: the boundaries are unknown, so the tokens
        # count as one sequence (exact for the 4 K V T term; the n^2 term then
        # assumes full blocks except the last).
        return [T]
    cu = cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def _block(q: torch.Tensor, block_size: int | None) -> int:
    if block_size is not None:
        return block_size
    return DEFAULT_BLOCK_SIZE.get(q.device.type, DEFAULT_BLOCK_SIZE["cpu"])


@register_flop_formula(torch.ops.m1._lightning_attn_fwd, get_raw=True)
def _lightning_fwd_formula(q, k, v, slope, initial_state=None, cu_seqlens=None, *, scale=1.0, block_size=None,
                           out_val=None, **kwargs) -> int:
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    return lightning_prefill_flops(_seq_lens(q, cu_seqlens), H, K, V, _block(q, block_size))


@register_flop_formula(torch.ops.m1._lightning_attn_bwd, get_raw=True)
def _lightning_bwd_formula(grad_o, grad_final_state, q, k, v, slope, initial_state=None, cu_seqlens=None, *,
                           scale=1.0, block_size=None, out_val=None, **kwargs) -> int:
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    return lightning_prefill_backward_flops(_seq_lens(q, cu_seqlens), H, K, V, _block(q, block_size))


@register_flop_formula(torch.ops.m1.lightning_attn_decode)
def _lightning_decode_formula(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, K = q_shape
    return lightning_decode_flops(B, H, K, v_shape[2])


# ----------------------------------------------------------------------- fused MoE
#
# Per (token, expert) pair: gate/up  x W_gate_up^T  [1, D] x [D, 2F]  4 D F
#                           down     h W_down^T     [1, F] x [F, D]   2 D F
# The router product and the weighted sum over k are elementwise or outside the op.


def moe_flops(tokens: int, top_k: int, dim: int, ffn: int) -> int:
    """Forward of m1ops.fused_moe: 6 D F per (token, expert) pair."""
    return 6 * tokens * top_k * dim * ffn


def moe_backward_flops(tokens: int, top_k: int, dim: int, ffn: int, *, recompute_gate_up: bool) -> int:
    """Backward per (token, expert) pair: dh = dy W_down 2 D F, dW_down = dy^T h 2 D F,
    dW_gate_up = d(gate, up)^T x 4 D F, dx = d(gate, up) W_gate_up 4 D F; the gate/up
    pre-activations are recomputed (another 4 D F) when the forward did not keep them.
    grad_topk_weights = <dh, h> is elementwise."""
    return (12 + (4 if recompute_gate_up else 0)) * tokens * top_k * dim * ffn


@register_flop_formula(torch.ops.m1.fused_moe)
def _fused_moe_formula(x_shape, w_gate_up_shape, w_down_shape, topk_weights_shape, topk_ids_shape, *args,
                       out_shape=None, **kwargs) -> int:
    T, k = topk_ids_shape
    return moe_flops(T, k, x_shape[1], w_down_shape[2])


@register_flop_formula(torch.ops.m1.fused_moe_backward)
def _fused_moe_backward_formula(grad_y_shape, x_shape, w_gate_up_shape, w_down_shape, topk_weights_shape,
                                topk_ids_shape, gate_up_shape=None, *args, out_shape=None, **kwargs) -> int:
    T, k = topk_ids_shape
    return moe_backward_flops(T, k, x_shape[1], w_down_shape[2], recompute_gate_up=gate_up_shape is None)


# -------------------------------------------------------------------- FP32 LM head
#
# z = hidden @ weight^T: [N, D] x [D, Vocab], 2 N Vocab D. fp32_logprobs never
# keeps z: its backward recomputes it tile by tile (another 2 N Vocab D), then
# dhidden = G weight and dweight = G^T hidden, 2 N Vocab D each when requested.
# Every row is computed, ignored targets included.


def logits_flops(rows: int, vocab: int, dim: int) -> int:
    """hidden [rows, dim] @ weight[vocab, dim]^T."""
    return 2 * rows * vocab * dim


def logprobs_backward_flops(rows: int, vocab: int, dim: int, *, grad_hidden: bool, grad_weight: bool) -> int:
    return logits_flops(rows, vocab, dim) * (1 + int(grad_hidden) + int(grad_weight))


def logits_backward_flops(rows: int, vocab: int, dim: int, *, grad_hidden: bool, grad_weight: bool) -> int:
    return logits_flops(rows, vocab, dim) * (int(grad_hidden) + int(grad_weight))


@register_flop_formula([torch.ops.m1.fp32_logprobs, torch.ops.m1.fp32_logits])
def _logits_formula(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return logits_flops(hidden_shape[0], weight_shape[0], hidden_shape[1])


@register_flop_formula(torch.ops.m1._fp32_logprobs_backward)
def _logprobs_backward_formula(grad_logprobs_shape, grad_entropy_shape, grad_lse_shape, hidden_shape, weight_shape,
                               *args, grad_hidden=True, grad_weight=True, out_shape=None, **kwargs) -> int:
    return logprobs_backward_flops(hidden_shape[0], weight_shape[0], hidden_shape[1],
                                   grad_hidden=grad_hidden, grad_weight=grad_weight)


@register_flop_formula(torch.ops.m1._fp32_logits_backward)
def _logits_backward_formula(grad_logits_shape, hidden_shape, weight_shape, *args, grad_hidden=True,
                             grad_weight=True, out_shape=None, **kwargs) -> int:
    return logits_backward_flops(hidden_shape[0], weight_shape[0], hidden_shape[1],
                                 grad_hidden=grad_hidden, grad_weight=grad_weight)


# ------------------------------------------------- softmax attention on the CPU
#
# torch counts SDPA's CUDA kernels (flash, efficient, cuDNN) but has no formula
# for the CPU flash-attention kernel that F.scaled_dot_product_attention
# dispatches to on the CPU, so m1model's softmax layers would count 0 FLOPs
# there. Register torch's own SDPA counts for it (the full score matrix, GQA
# broadcast, causal masking not subtracted), unless a later torch has one.

def _register_cpu_sdpa() -> None:
    from torch.utils import flop_counter

    aten = torch.ops.aten
    pairs = (
        (aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
        (aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop),
    )
    for target, formula in pairs:
        if target not in flop_counter.flop_registry:
            flop_counter.flop_registry[target] = formula  # already shape-wrapped by torch's decorator


_register_cpu_sdpa()


# ------------------------------------------------ oneDNN linear on the CPU
#
# m1model runs its dense projections through torch.ops.mkldnn._linear_pointwise
# (oneDNN's linear with a fused activation, the op inductor uses on the CPU);
# torch has no formula for it. y = x W^T: [M, K] x [K, N], 2 M N K; the fused
# activation is elementwise and not counted. Overloads: default (x, W, b, ...)
# and binary (x, other, W, b, ...), where `other` has the output's shape.


def _register_onednn_linear() -> None:
    from torch.utils import flop_counter

    packet = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if packet is None or packet in flop_counter.flop_registry:
        return

    @register_flop_formula(packet)
    def _onednn_linear_formula(x_shape, second_shape, *args, out_shape=None, **kwargs) -> int:
        # default: (x, W, b, attr, ...); binary: (x, other, W, b, attr, ...): attr follows b.
        weight_shape = second_shape if len(args) > 1 and isinstance(args[1], str) else args[0]
        return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * x_shape[-1]


_register_onednn_linear()
