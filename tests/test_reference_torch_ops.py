"""m1ops.reference.torch_ops (the model's reference path) against the independent float64 references.

torch_ops computes in float64 for float64 inputs, so both sides agree to float64
rounding over the reductions (1e-10 leaves a wide margin); the fp32 comparison
with the kernels is tests/test_model_forward.py::test_reference_switch.
"""

from __future__ import annotations

import pytest
import torch

from m1ops import reference as R
from m1ops.reference import torch_ops
from helpers import assert_rel_close

TOL = 1e-10


@pytest.mark.parametrize(
    "T,cu,block",
    [(1, None, None), (70, None, 16), (257, None, 64), (90, [0, 0, 1, 41, 90], 32)],
)
def test_lightning_attn(T, cu, block):
    H, K, V = 3, 8, 5
    B = 2 if cu is None else 1
    N = B if cu is None else len(cu) - 1
    q, k = torch.randn(2, B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    slope = torch.tensor([0.02, 0.3, 1.1])
    s0 = torch.randn(N, H, K, V, dtype=torch.float64)
    cu_t = None if cu is None else torch.tensor(cu)
    o, final = torch_ops.lightning_attn(
        q, k, v, slope, scale=0.7, initial_state=s0, output_final_state=True, cu_seqlens=cu_t, block_size=block
    )
    o_ref, final_ref = R.lightning_attn_ref(q, k, v, slope, scale=0.7, initial_state=s0, cu_seqlens=cu_t)
    assert_rel_close(o, o_ref, TOL, "o")
    assert_rel_close(final, final_ref, TOL, "final_state")


def test_lightning_attn_decode():
    B, H, K, V = 2, 3, 8, 5
    q, k = torch.randn(2, B, H, K, dtype=torch.float64)
    v = torch.randn(B, H, V, dtype=torch.float64)
    slope = torch.tensor([0.02, 0.3, 1.1])
    state = torch.randn(B, H, K, V, dtype=torch.float64)
    o_ref, state_ref = R.lightning_attn_decode_ref(q, k, v, slope, state, scale=0.5)
    o = torch_ops.lightning_attn_decode(q, k, v, slope, state, scale=0.5)
    assert_rel_close(o, o_ref, TOL, "o")
    assert_rel_close(state, state_ref, TOL, "state (updated in place)")


@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (9, 1, 1), (33, 8, 2), (20, 6, 4)])
def test_moe(T, E, k):
    D, F = 12, 10
    logits = torch.randn(T, E, dtype=torch.float64)
    logits[: T // 2, :2] = 0.5  # ties: the lower index wins
    w, ids = torch_ops.moe_route(logits, k)
    w_ref, ids_ref = R.moe_route_ref(logits, k)
    assert torch.equal(ids, ids_ref)
    assert_rel_close(w, w_ref, 1e-6, "topk_weights")  # torch_ops routes in fp32 (DESIGN 3.2)
    x = torch.randn(T, D, dtype=torch.float64)
    w_gate_up = torch.randn(E, 2 * F, D, dtype=torch.float64)
    w_down = torch.randn(E, D, F, dtype=torch.float64)
    y = torch_ops.fused_moe(x, w_gate_up, w_down, w_ref, ids_ref)
    assert_rel_close(y, R.fused_moe_ref(x, w_gate_up, w_down, w_ref, ids_ref), TOL, "y")


@pytest.mark.parametrize("N,V", [(1, 1), (17, 7), (40, 300)])
def test_logits(N, V):
    D = 16
    hidden = torch.randn(N, D, dtype=torch.float64)
    weight = torch.randn(V, D, dtype=torch.float64)
    targets = torch.randint(0, V, (N,))
    targets[::3] = -100
    logp, ent = torch_ops.fp32_logprobs(hidden, weight, targets, temperature=0.8, return_entropy=True)
    logp_ref, ent_ref, _ = R.fp32_logprobs_ref(hidden, weight, targets, temperature=0.8)
    assert_rel_close(logp, logp_ref, TOL, "logprobs")
    assert_rel_close(ent, ent_ref, TOL, "entropy")
    assert_rel_close(torch_ops.fp32_logits(hidden, weight), R.fp32_logits_ref(hidden, weight), TOL, "logits")
