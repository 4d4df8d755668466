"""The m1ops wrappers take any strides: transposed and strided inputs give what contiguous ones give.

The raw torch.ops.m1 ops keep their layout checks (tests/test_<op>.py); the
wrappers copy what the kernels cannot read in place. Results must be bitwise
equal to the contiguous call (the same kernel runs on the same values), and
gradients must reach the caller's strided leaves.
"""

from __future__ import annotations

import pytest
import torch

from helpers import gapped, transposed

import m1ops


def grads(fn, leaves):
    leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    outs = [o for o in outs if o is not None]
    gens = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=gens, dtype=o.dtype) for o in outs]
    diff = [x for x in leaves if x.requires_grad]
    return outs, torch.autograd.grad(outs, diff, cot)


def check(fn, plain, views):
    out_a, g_a = grads(fn, plain)
    out_b, g_b = grads(fn, views)
    for a, b in zip(out_a, out_b):
        assert torch.equal(a, b)
    for a, b in zip(g_a, g_b):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", [gapped, transposed], ids=["strided", "transposed"])
def test_lightning_attn(layout):
    B, T, H, K, V = 2, 37, 3, 8, 6
    q, k = torch.randn(2, B, T, H, K)
    v = torch.randn(B, T, H, V)
    s0 = torch.randn(B, H, K, V)
    slope = torch.tensor([0.1, 0.5, 1.0])

    def fn(q, k, v, s0):
        return m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True, block_size=16)

    check(fn, [q, k, v, s0], [layout(q), layout(k), layout(v), layout(s0)])


def test_lightning_attn_decode():
    B, H, K, V = 2, 3, 8, 6
    q, k = torch.randn(2, B, H, K)
    v = torch.randn(B, H, V)
    slope = torch.tensor([0.1, 0.5, 1.0])
    state = torch.randn(B, H, K, V)
    s1, s2 = state.clone(), state.clone()
    o1 = m1ops.lightning_attn_decode(q, k, v, slope, s1)
    o2 = m1ops.lightning_attn_decode(transposed(q), gapped(k), transposed(v), slope, s2)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)


@pytest.mark.parametrize("layout", [gapped, transposed], ids=["strided", "transposed"])
def test_fused_moe(layout):
    T, D, F, E, k = 19, 12, 8, 4, 2
    x = torch.randn(T, D)
    w_gate_up = torch.randn(E, 2 * F, D) / D**0.5
    w_down = torch.randn(E, D, F) / F**0.5
    topk_weights, topk_ids = m1ops.moe_route(torch.randn(T, E), k)

    def fn(x, w_gate_up, w_down, topk_weights, topk_ids):
        return m1ops.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)

    check(
        fn,
        [x, w_gate_up, w_down, topk_weights, topk_ids],
        [layout(x), layout(w_gate_up), layout(w_down), layout(topk_weights), transposed(topk_ids)],
    )


@pytest.mark.parametrize("layout", [gapped, transposed], ids=["strided", "transposed"])
def test_fp32_head(layout):
    N, D, V = 9, 16, 40
    hidden = torch.randn(N, D)
    weight = torch.randn(V, D) / D**0.5
    targets = torch.randint(0, V, (N,))

    def logprobs(hidden, weight):
        return m1ops.fp32_logprobs(hidden, weight, targets, return_entropy=True)

    check(logprobs, [hidden, weight], [layout(hidden), layout(weight)])
    check(m1ops.fp32_logits, [hidden, weight], [layout(hidden), layout(weight)])


def test_raw_ops_reject_rows_that_are_not_unit_stride():
    """Below the wrappers the kernels read raw pointers: a clear error, never a wrong read."""
    q = gapped(torch.randn(1, 20, 2, 8))
    k, v = torch.randn(2, 1, 20, 2, 8)
    slope = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="'q' must be contiguous in its last dimension"):
        torch.ops.m1._lightning_attn_fwd(q, k, v, slope)
    with pytest.raises(ValueError, match="'q' must be contiguous in its last dimension"):
        torch.ops.m1.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], slope, torch.zeros(1, 2, 8, 8))
    x = gapped(torch.randn(8, 16))
    w_gate_up, w_down = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    topk_weights, topk_ids = torch.ones(8, 1), torch.zeros(8, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="'x' must be contiguous in its last dimension"):
        torch.ops.m1.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)
    with pytest.raises(ValueError, match="'w_gate_up' must be contiguous"):
        torch.ops.m1.fused_moe(x.contiguous(), transposed(w_gate_up), w_down, topk_weights, topk_ids)
    with pytest.raises(ValueError, match="'topk_weights' must be contiguous"):
        torch.ops.m1.fused_moe(x.contiguous(), w_gate_up, w_down, gapped(torch.ones(8, 2))[:, :1], topk_ids)
    with pytest.raises(ValueError, match="'hidden' must be contiguous in its last dimension"):
        torch.ops.m1.fp32_logprobs(x, torch.randn(5, 16), torch.zeros(8, dtype=torch.long))
