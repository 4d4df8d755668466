"""m1ops.lightning_attn (blockwise prefill + backward) against the float64 references (DESIGN 3.1).

Shapes: B batch, T tokens, H heads, K key dim, V value dim, N sequences.

Tolerances (relative error ||out - ref|| / ||ref||, against float64 math on the
same rounded inputs):
  CPU   every product is accumulated in fp32 (fp64 for float64) and each output
        is rounded once to its dtype, so the error is the unit roundoff u of the
        output dtype (a norm-wise bound for round-to-nearest) plus an fp32
        accumulation allowance of 1e-5 (DESIGN 4). States and d initial_state
        are fp32 whatever the input dtype: accumulation allowance only.
  CUDA  fp32 inputs go through TF32 tensor cores (10-bit mantissa, u = 2^-11):
        the score tile and the state are rounded to TF32 once more before their
        second product, so allow 4u + 1e-5 ~ 2e-3. bf16/fp16 go through bf16/fp16
        MMA with the same two extra roundings: allow 2x the error of a same-dtype
        PyTorch blockwise implementation on the same inputs (the DESIGN 4 rule),
        and never less than the CPU bound.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import DEVICES, assert_rel_close, rel_err, with_

import m1ops
from m1ops.reference import lightning_attn_ref

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ACCUM_TOL = 1e-5
TF32_TOL = 4 * 2.0**-11 + ACCUM_TOL


@pytest.fixture(autouse=True)
def _poison_uninitialized():
    """Every output the kernels allocate starts as NaN (torch fills torch.empty in
    deterministic mode), so an element a kernel forgets to write fails the test."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before)


def skip_unsupported(device, dtype=None, K=None, V=None):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only dtype (for gradcheck)")
    if device == "cuda" and K is not None and not (K == V and K in (64, 128)):
        pytest.skip("the CUDA kernels take K = V in {64, 128}")


def make_inputs(B, T, H, K, V, dtype, device, *, N=None, requires_grad=False):
    """q, k, v, slope, initial_state. k is scaled by 1/sqrt(K) so that outputs stay O(1)
    (and fp16 in range); slopes span MiniMax's range of fast and slow heads."""
    q = torch.randn(B, T, H, K, device=device).to(dtype)
    k = (torch.randn(B, T, H, K, device=device) / K**0.5).to(dtype)
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    slope = torch.logspace(-3, 0, H, device=device) if H > 1 else torch.full((H,), 0.1, device=device)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    s0 = torch.randn(B if N is None else N, H, K, V, device=device, dtype=state_dtype)
    if requires_grad:
        for t in (q, k, v, s0):
            t.requires_grad_()
    return q, k, v, slope, s0


def torch_blockwise(q, k, v, slope, scale, s0, block=64):
    """The blockwise algorithm in plain PyTorch in the inputs' dtype (for the
    CUDA tolerance rule: same-dtype implementation error)."""
    B, T, H, K = q.shape
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    s = slope.view(1, H, 1, 1).to(torch.float32)
    state = s0.to(q.dtype)
    outs = []
    for t0 in range(0, T, block):
        n = min(block, T - t0)
        idx = torch.arange(n, device=q.device, dtype=torch.float32)
        dist = idx[:, None] - idx[None, :]
        mask = torch.exp(-s * dist.clamp(min=0)) * (dist >= 0)  # [1, H, n, n]
        qb, kb, vb = qh[:, :, t0 : t0 + n], kh[:, :, t0 : t0 + n], vh[:, :, t0 : t0 + n]
        scores = (qb @ kb.transpose(-1, -2)) * mask.to(q.dtype)
        o = scores @ vb + (qb * torch.exp(-s * (idx + 1)).transpose(-1, -2).to(q.dtype)) @ state
        outs.append(scale * o)
        kd = kb * torch.exp(-s * (n - 1 - idx)).transpose(-1, -2).to(q.dtype)
        state = state * torch.exp(-s * n).to(q.dtype) + kd.transpose(-1, -2) @ vb
    return torch.cat(outs, dim=2).transpose(1, 2)


def output_tol(device, dtype, same_dtype_err=None):
    cpu = UNIT_ROUNDOFF[dtype] + ACCUM_TOL
    if device == "cpu" or dtype == torch.float64:
        return cpu
    if dtype == torch.float32:
        return TF32_TOL
    return max(cpu, 2 * same_dtype_err)


def state_tol(device, dtype):
    if device == "cuda" and dtype != torch.float64:
        return TF32_TOL if dtype == torch.float32 else 2 * UNIT_ROUNDOFF[dtype] + ACCUM_TOL  # k^T v from rounded operands
    return ACCUM_TOL if dtype != torch.float64 else 1e-12


def grad_tol(device, dtype):
    # A gradient is an output of the backward: rounded once to the input dtype on the CPU;
    # on CUDA its score tiles and state pass through the MMA dtype once more (x4 as for o).
    if device == "cpu" or dtype == torch.float64:
        return UNIT_ROUNDOFF[dtype] + ACCUM_TOL if dtype != torch.float64 else 1e-12
    return TF32_TOL if dtype == torch.float32 else 4 * UNIT_ROUNDOFF[dtype] + ACCUM_TOL


FWD_SHAPES = {  # (B, T, H, K, V)
    "T=1": (2, 1, 3, 64, 64),
    "T=63": (1, 63, 2, 64, 64),
    "T=256": (2, 256, 2, 128, 128),
    "T=257": (1, 257, 4, 64, 64),
    "T=1000": (1, 1000, 2, 64, 64),
    "T=257,K!=V": (2, 257, 3, 48, 80),
    "T=100,K=V=256": (1, 100, 2, 256, 256),
    "T=70,K=5,V=3": (3, 70, 1, 5, 3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("shape", FWD_SHAPES.values(), ids=FWD_SHAPES.keys())
def test_forward_matches_reference(shape, dtype, device):
    B, T, H, K, V = shape
    skip_unsupported(device, dtype, K, V)
    q, k, v, slope, s0 = make_inputs(B, T, H, K, V, dtype, device)
    o, final = m1ops.lightning_attn(q, k, v, slope, scale=0.75, initial_state=s0, output_final_state=True)
    ref_o, ref_final = lightning_attn_ref(q, k, v, slope, scale=0.75, initial_state=s0)
    assert o.dtype == v.dtype and o.shape == v.shape and o.is_contiguous()
    assert final.dtype == s0.dtype and final.shape == s0.shape
    same_dtype_err = rel_err(torch_blockwise(q, k, v, slope, 0.75, s0), ref_o) if device == "cuda" else None
    assert_rel_close(o, ref_o, output_tol(device, dtype, same_dtype_err), "o")
    assert_rel_close(final, ref_final, state_tol(device, dtype), "final_state")


@pytest.mark.parametrize("device", DEVICES)
def test_no_state_and_no_final_state(device):
    """Zero initial state when none is given; final_state is None unless asked for."""
    q, k, v, slope, s0 = make_inputs(2, 100, 2, 64, 64, torch.float32, device)
    o, final = m1ops.lightning_attn(q, k, v, slope)
    assert final is None
    ref_o, _ = lightning_attn_ref(q, k, v, slope)
    assert_rel_close(o, ref_o, output_tol(device, torch.float32), "o")
    o2, _ = m1ops.lightning_attn(q, k, v, slope, initial_state=torch.zeros_like(s0))
    assert_rel_close(o2, o, 1e-6, "o with explicit zero state")


def make_grads(o, final, device):
    return torch.randn(o.shape, device=device).to(o.dtype), torch.randn(final.shape, device=device).to(final.dtype)


def check_gradients(q, k, v, slope, s0, *, device, dtype, scale=1.0, cu_seqlens=None, block_size=None):
    """Gradients of <o, do> + <final, dfinal> from m1 against autograd through the float64 reference."""
    o, final = m1ops.lightning_attn(q, k, v, slope, scale=scale, initial_state=s0, output_final_state=True,
                                    cu_seqlens=cu_seqlens, block_size=block_size)
    do, dfinal = make_grads(o, final, device)
    grads = torch.autograd.grad([o, final], [q, k, v, s0], [do, dfinal])
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, s0)]
    ref_o, ref_final = lightning_attn_ref(*leaves[:3], slope, scale=scale, initial_state=leaves[3], cu_seqlens=cu_seqlens)
    ref_grads = torch.autograd.grad([ref_o, ref_final], leaves, [do.double(), dfinal.double()])
    for name, g, ref, x in zip(("dq", "dk", "dv", "d initial_state"), grads, ref_grads, (q, k, v, s0)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        tol = grad_tol(device, dtype) if name != "d initial_state" else state_tol(device, dtype)
        assert_rel_close(g, ref, tol, name)


BWD_SHAPES = {  # (B, T, H, K, V)
    "T=1": (2, 1, 2, 64, 64),
    "T=63": (1, 63, 3, 64, 64),
    "T=257": (2, 257, 2, 64, 64),
    "T=1000": (1, 1000, 2, 128, 128),
    "T=130,K!=V": (2, 130, 2, 24, 40),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*FLOAT_DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("shape", BWD_SHAPES.values(), ids=BWD_SHAPES.keys())
def test_backward_matches_reference(shape, dtype, device):
    B, T, H, K, V = shape
    skip_unsupported(device, dtype, K, V)
    q, k, v, slope, s0 = make_inputs(B, T, H, K, V, dtype, device, requires_grad=True)
    check_gradients(q, k, v, slope, s0, device=device, dtype=dtype, scale=0.5)


def test_gradcheck_float64():
    """Numerical gradients, both outputs, with several blocks, varlen and a carried state."""
    H, K, V = 2, 4, 3
    cu = torch.tensor([0, 5, 5, 6, 17])  # an empty and a length-1 segment
    q, k, v = (torch.randn(1, 17, H, d, dtype=torch.float64, requires_grad=True) for d in (K, K, V))
    s0 = torch.randn(4, H, K, V, dtype=torch.float64, requires_grad=True)
    slope = torch.tensor([0.05, 0.9])

    def fn(q, k, v, s0):
        return m1ops.lightning_attn(q, k, v, slope, scale=0.7, initial_state=s0, output_final_state=True,
                                    cu_seqlens=cu, block_size=3)

    assert torch.autograd.gradcheck(fn, (q, k, v, s0))
    # No initial state, one sequence per batch row, a block longer than the sequence.
    q2, k2, v2 = (x[:, :9].detach().expand(2, 9, H, x.shape[-1]).clone().requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: m1ops.lightning_attn(q, k, v, slope, output_final_state=True, block_size=16), (q2, k2, v2)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_varlen_matches_separate_sequences(cu_dtype, dtype, device):
    """Packed segments (empty and length-1 ones included) behave as independent sequences,
    each with its own initial and final state; gradients too."""
    H, K, V = 2, 64, 64
    lengths = [70, 0, 1, 129, 0, 64, 3]
    T, N = sum(lengths), len(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=cu_dtype, device=device)
    q, k, v, slope, s0 = make_inputs(1, T, H, K, V, dtype, device, N=N, requires_grad=True)
    check_gradients(q, k, v, slope, s0, device=device, dtype=dtype, cu_seqlens=cu)

    o, final = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, final_n = m1ops.lightning_attn(q[:, start:end], k[:, start:end], v[:, start:end], slope,
                                            initial_state=s0[n : n + 1], output_final_state=True)
        # Same math, possibly other BLAS tile shapes: at most one rounding of o apart.
        assert_rel_close(o[:, start:end], o_n, 2 * UNIT_ROUNDOFF[dtype] + 1e-6, f"segment {n} o")
        assert_rel_close(final[n : n + 1], final_n, 1e-6, f"segment {n} final_state")
        if start == end:
            torch.testing.assert_close(final[n], s0[n], rtol=0, atol=0)  # an empty segment passes its state through


@pytest.mark.parametrize("shape", [(2, 10, 2, 0, 4), (2, 10, 2, 4, 0), (0, 10, 2, 4, 4), (2, 10, 0, 4, 4), (2, 0, 2, 4, 4)],
                         ids=["K=0", "V=0", "B=0", "H=0", "T=0"])
def test_degenerate_shapes(shape):
    """Empty dimensions: every output and gradient is written (NaN-poisoned otherwise) and right."""
    q, k, v, slope, s0 = make_inputs(*shape, torch.float32, "cpu", requires_grad=True)
    o, final = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True)
    ref_o, ref_final = lightning_attn_ref(q.detach(), k.detach(), v.detach(), slope, initial_state=s0.detach())
    assert_rel_close(o, ref_o, ACCUM_TOL, "o")
    assert_rel_close(final, ref_final, ACCUM_TOL, "final_state")
    do, dfinal = make_grads(o, final, "cpu")
    dq, dk, dv, ds0 = torch.autograd.grad([o, final], [q, k, v, s0], [do, dfinal])
    # The only non-zero gradient of an empty problem: with no tokens, final_state = initial_state.
    expected_ds0 = dfinal if shape[1] == 0 else None
    if expected_ds0 is not None:
        torch.testing.assert_close(ds0, expected_ds0, rtol=0, atol=0)
    if shape[3] == 0 or shape[4] == 0:  # K or V empty: o = 0 and every gradient of q, k, v vanishes
        for g in (dq, dk, dv):
            torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=0)
    for g, x in zip((dq, dk, dv, ds0), (q, k, v, s0)):
        assert g.shape == x.shape and torch.isfinite(g).all()


def test_varlen_no_segments():
    q, k, v, slope, _ = make_inputs(1, 0, 2, 8, 8, torch.float32, "cpu")
    o, final = m1ops.lightning_attn(q, k, v, slope, output_final_state=True, cu_seqlens=torch.tensor([0]))
    assert o.shape == (1, 0, 2, 8) and final.shape == (0, 2, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_block_size_independence(dtype):
    """Every block size computes the same function (to fp32 rounding): the decay
    factors are exact powers from one exp, not products of per-block factors."""
    q, k, v, slope, s0 = make_inputs(2, 300, 3, 24, 40, dtype, "cpu", requires_grad=True)
    do = torch.randn(2, 300, 3, 40, dtype=dtype)
    results = []
    for bs in (1, 7, 64, 256, 299, 300, 4096):
        o, final = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True, block_size=bs)
        grads = torch.autograd.grad([o, final], [q, k, v, s0], [do, torch.ones_like(final)])
        results.append((bs, [o, final, *grads]))
    tol = 1e-12 if dtype == torch.float64 else 2 * ACCUM_TOL  # two fp32 results, each within ACCUM_TOL of exact
    for bs, outs in results[1:]:
        for name, x, ref in zip(("o", "final", "dq", "dk", "dv", "ds0"), outs, results[0][1]):
            assert_rel_close(x, ref, tol, f"block_size={bs} vs 1: {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_default_block_size_is_documented(device):
    q, k, v, slope, s0 = make_inputs(1, 200, 2, 64, 64, torch.float32, device)
    o, f = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True)
    bs = m1ops.lightning.DEFAULT_BLOCK_SIZE[device]
    o2, f2 = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True, block_size=bs)
    torch.testing.assert_close(o, o2, rtol=0, atol=0)
    torch.testing.assert_close(f, f2, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_prefill_then_decode_equals_longer_prefill(dtype, device):
    """Prefill T tokens, then decode n with its final state == prefill of T + n."""
    skip_unsupported(device, dtype)
    B, T, n, H, K, V = 2, 100, 5, 2, 64, 64
    q, k, v, slope, s0 = make_inputs(B, T + n, H, K, V, dtype, device)
    o_long, final_long = m1ops.lightning_attn(q, k, v, slope, scale=0.5, initial_state=s0, output_final_state=True)
    o_pre, state = m1ops.lightning_attn(q[:, :T], k[:, :T], v[:, :T], slope, scale=0.5, initial_state=s0,
                                        output_final_state=True)
    outs = [m1ops.lightning_attn_decode(q[:, t], k[:, t], v[:, t], slope, state, scale=0.5) for t in range(T, T + n)]
    tol = output_tol(device, dtype, same_dtype_err=2 * UNIT_ROUNDOFF[dtype])
    assert_rel_close(o_pre, o_long[:, :T], tol, "prefill part")
    assert_rel_close(torch.stack(outs, dim=1), o_long[:, T:], tol, "decoded tokens")
    assert_rel_close(state, final_long, state_tol(device, dtype), "state after decode")


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_carries_state_and_gradients(device):
    """Two chunks joined by final_state -> initial_state equal one long prefill,
    forward and backward (the gradient on final_state flows into the first chunk)."""
    B, T1, T2, H, K, V = 2, 90, 77, 2, 64, 64
    q, k, v, slope, s0 = make_inputs(B, T1 + T2, H, K, V, torch.float32, device, requires_grad=True)
    do = torch.randn(B, T1 + T2, H, V, device=device)
    dfinal = torch.randn(B, H, K, V, device=device)
    o, final = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True)
    whole = torch.autograd.grad([o, final], [q, k, v, s0], [do, dfinal])

    o1, mid = m1ops.lightning_attn(q[:, :T1], k[:, :T1], v[:, :T1], slope, initial_state=s0, output_final_state=True)
    o2, final2 = m1ops.lightning_attn(q[:, T1:], k[:, T1:], v[:, T1:], slope, initial_state=mid, output_final_state=True)
    # Other block boundaries: fp32 rounding apart (TF32 rounding on CUDA).
    tol = 2 * ACCUM_TOL if device == "cpu" else 2 * TF32_TOL
    assert_rel_close(torch.cat([o1, o2], dim=1), o, tol, "o")
    assert_rel_close(final2, final, tol, "final_state")
    chunked = torch.autograd.grad([o1, o2, final2], [q, k, v, s0], [do[:, :T1], do[:, T1:], dfinal])
    for name, g, ref in zip(("dq", "dk", "dv", "d initial_state"), chunked, whole):
        assert_rel_close(g, ref, tol, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_qkv_views(dtype, device):
    """q, k, v as slices of one fused projection [B, T, H, 3D] (how the model produces them)."""
    B, T, H, D = 2, 150, 2, 64
    qkv = torch.randn(B, T, H, 3 * D, device=device).to(dtype).requires_grad_()
    q, k, v = qkv.split(D, dim=-1)
    assert not q.is_contiguous()
    slope = torch.tensor([0.02, 0.3], device=device)
    do = torch.randn(B, T, H, D, device=device).to(dtype)
    o, final = m1ops.lightning_attn(q, k, v, slope, output_final_state=True)
    (g,) = torch.autograd.grad(o, qkv, do)
    qc, kc, vc = (x.detach().contiguous().requires_grad_() for x in (q, k, v))
    oc, finalc = m1ops.lightning_attn(qc, kc, vc, slope, output_final_state=True)
    gc = torch.autograd.grad(oc, [qc, kc, vc], do)
    torch.testing.assert_close(o, oc, rtol=0, atol=0)
    torch.testing.assert_close(final, finalc, rtol=0, atol=0)
    torch.testing.assert_close(g, torch.cat(gc, dim=-1), rtol=0, atol=0)
    # A batch-strided and a head-strided view work too.
    big = torch.randn(2 * B, T, 2 * H, D, device=device).to(dtype)
    o2, _ = m1ops.lightning_attn(big[::2, :, ::2], big[1::2, :, ::2], big[::2, :, 1::2], slope)
    ref, _ = m1ops.lightning_attn(*(x.contiguous() for x in (big[::2, :, ::2], big[1::2, :, ::2], big[::2, :, 1::2])), slope)
    torch.testing.assert_close(o2, ref, rtol=0, atol=0)


def test_fake_impl_shapes():
    q, k, v, slope, s0 = (t.to("meta") for t in make_inputs(1, 10, 3, 16, 24, torch.bfloat16, "cpu", N=4))
    cu = torch.tensor([0, 2, 2, 5, 10], device="meta")
    o, final = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, 10, 3, 24) and o.dtype == torch.bfloat16 and o.device.type == "meta"
    assert final.shape == (4, 3, 16, 24) and final.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype, device):
    skip_unsupported(device, dtype)
    H, K, V = 2, 64, 64
    cu = torch.tensor([0, 3, 3, 20], device=device)
    q, k, v, slope, s0 = make_inputs(1, 20, H, K, V, dtype, device, N=3, requires_grad=True)
    fwd = torch.ops.m1._lightning_attn_fwd.default
    for args, kwargs in [
        ((q, k, v, slope), {}),
        ((q, k, v, slope, s0, cu), {"scale": 0.5, "block_size": 64}),
        ((q, k, v, slope, None, cu), {}),
        ((q.detach()[:, :0], k.detach()[:, :0], v.detach()[:, :0], slope), {}),
    ]:
        torch.library.opcheck(fwd, args, kwargs)
    do = torch.randn(1, 20, H, V, device=device).to(dtype)
    dfinal = torch.randn_like(s0)
    detached = [x.detach() for x in (q, k, v)]
    torch.library.opcheck(torch.ops.m1._lightning_attn_bwd.default, (do, dfinal, *detached, slope, s0.detach(), cu),
                          {"scale": 0.5})
    torch.library.opcheck(torch.ops.m1._lightning_attn_bwd.default, (do, None, *detached, slope))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """Forward and backward with the surrounding projection compile into one graph."""
    B, T, H, D = 1, 80, 2, 64
    x = torch.randn(B, T, H, 3 * D, device=device, requires_grad=True)
    slope = torch.tensor([0.05, 0.5], device=device)
    s0 = torch.randn(B, H, D, D, device=device)

    def layer(x, s0):
        q, k, v = torch.nn.functional.silu(x).split(D, dim=-1)
        o, final = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True)
        return o.square().sum() + final.sum()

    (eager,) = torch.autograd.grad(layer(x, s0), x)
    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, fullgraph=True)
    (compiled,) = torch.autograd.grad(compiled_layer(x, s0), x)
    # Inductor fuses silu and square: fp32 rounding apart, which TF32 inputs on CUDA can turn into
    # one TF32 rounding here and there.
    assert_rel_close(compiled, eager, 1e-5 if device == "cpu" else TF32_TOL, "d x")


def _bad_cases():
    """(id, mutate(args) -> args, exception type, message fragment)."""

    cu = lambda values: (lambda a: torch.tensor(values))  # noqa: E731
    return [
        ("q-3d", with_(q=lambda a: a["q"][0]), ValueError, "'q' must be 4-D"),
        ("k-shape", with_(k=lambda a: a["k"][..., :-1]), ValueError, "'k' must have shape"),
        ("v-tokens", with_(v=lambda a: a["v"][:, :-1]), ValueError, "'v' must have shape"),
        ("slope-len", with_(slope=lambda a: a["slope"][:-1]), ValueError, "'slope' must have shape [H]"),
        ("slope-2d", with_(slope=lambda a: a["slope"][None]), ValueError, "'slope' must be 1-D"),
        ("slope-dtype", with_(slope=lambda a: a["slope"].double()), TypeError, "'slope' must be Float"),
        ("q-int", with_(q=lambda a: a["q"].int()), TypeError, "'q' must be float32, bfloat16 or float16"),
        ("v-dtype", with_(v=lambda a: a["v"].bfloat16()), TypeError, "'v' must be Float"),
        ("state-shape", with_(initial_state=lambda a: a["initial_state"][..., :-1]), ValueError,
         "'initial_state' must have shape"),
        ("state-batch", with_(initial_state=lambda a: a["initial_state"][:2]), ValueError,
         "'initial_state' must have shape [N, H, K, V] = [3, 2, 8, 12]"),
        ("state-bf16", with_(initial_state=lambda a: a["initial_state"].bfloat16()), TypeError,
         "'initial_state' must be float32"),
        ("cu-start", with_(cu_seqlens=cu([1, 5, 5, 20])), ValueError, "'cu_seqlens' must start at 0"),
        ("cu-decreasing", with_(cu_seqlens=cu([0, 5, 4, 20])), ValueError, "'cu_seqlens' must be non-decreasing"),
        ("cu-end-short", with_(cu_seqlens=cu([0, 5, 5, 19])), ValueError, "'cu_seqlens' must end at T = 20"),
        ("cu-end-long", with_(cu_seqlens=cu([0, 5, 5, 21])), ValueError, "'cu_seqlens' must end at T = 20"),
        ("cu-float", with_(cu_seqlens=lambda a: a["cu_seqlens"].float()), TypeError,
         "'cu_seqlens' must be int32 or int64"),
        ("cu-2d", with_(cu_seqlens=lambda a: a["cu_seqlens"][None]), ValueError, "'cu_seqlens' must be 1-D"),
        ("cu-empty", with_(cu_seqlens=lambda a: torch.tensor([], dtype=torch.long), initial_state=lambda a: None), ValueError,
         "'cu_seqlens' must hold N + 1 >= 1 offsets"),
        ("cu-batch-2", with_(**{x: (lambda a, x=x: a[x].expand(2, -1, -1, -1)) for x in ("q", "k", "v")}),
         ValueError, "q must have batch size 1"),
        ("block-0", with_(block_size=lambda a: 0), ValueError, "'block_size' must be in [1, 4096]"),
        ("block-huge", with_(block_size=lambda a: 5000), ValueError, "'block_size' must be in [1, 4096]"),
        ("head-dim", with_(**{x: (lambda a, x=x: torch.randn(1, 20, 2, 257)) for x in ("q", "k")},
                           initial_state=lambda a: None), ValueError, "head dims K, V must be <= 256"),
    ]


@pytest.mark.parametrize("name,mutate,exc,fragment", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_clear_errors(name, mutate, exc, fragment):
    q, k, v, slope, s0 = make_inputs(1, 20, 2, 8, 12, torch.float32, "cpu", N=3)
    args = mutate(dict(q=q, k=k, v=v, slope=slope, initial_state=s0, cu_seqlens=torch.tensor([0, 5, 5, 20]),
                       block_size=None))
    with pytest.raises(exc, match=re.escape(fragment)) as info:
        m1ops.lightning_attn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("slope"), **args)
    assert "m1._lightning_attn_fwd" in str(info.value)  # the error names the op


def test_backward_bad_inputs_raise():
    q, k, v, slope, s0 = make_inputs(2, 20, 2, 8, 12, torch.float32, "cpu")
    bwd = torch.ops.m1._lightning_attn_bwd
    with pytest.raises(ValueError, match=re.escape("'grad_o' must have shape")):
        bwd(torch.randn(2, 20, 2, 8), None, q, k, v, slope)
    with pytest.raises(TypeError, match=re.escape("'grad_o' must be Float")):
        bwd(torch.randn(2, 20, 2, 12).bfloat16(), None, q, k, v, slope)
    with pytest.raises(ValueError, match=re.escape("'grad_final_state' must have shape")):
        bwd(torch.randn(2, 20, 2, 12), s0[:1], q, k, v, slope)


def test_slope_gradient_is_refused():
    q, k, v, slope, _ = make_inputs(1, 8, 2, 4, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="no gradient with respect to 'slope'"):
        m1ops.lightning_attn(q, k, v, slope.requires_grad_())
    with torch.no_grad():
        m1ops.lightning_attn(q, k, v, slope)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a CUDA device")
def test_mixed_devices_and_cuda_limits_raise():
    q, k, v, slope, s0 = make_inputs(1, 20, 2, 64, 64, torch.float32, "cuda")
    for kwargs, fragment in [
        ({"slope": slope.cpu()}, "'slope' is on cpu"),
        ({"initial_state": s0.cpu()}, "'initial_state' is on cpu"),
        ({"cu_seqlens": torch.tensor([0, 20])}, "'cu_seqlens' is on cpu"),
    ]:
        args = dict(q=q, k=k, v=v, slope=slope) | kwargs
        with pytest.raises(RuntimeError, match=re.escape(fragment)):
            m1ops.lightning_attn(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("slope"), **args)
    with pytest.raises(ValueError, match=re.escape("K = V in {64, 128}")):
        m1ops.lightning_attn(q[..., :32], k[..., :32], v, slope)
    # block_size is a speed knob: the CUDA kernels run their 64-token tile whatever is asked.
    o_256, _ = m1ops.lightning_attn(q, k, v, slope, block_size=256)
    torch.testing.assert_close(o_256, m1ops.lightning_attn(q, k, v, slope)[0], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_takes_matches_the_op(device):
    """m1ops.lightning.kernel_takes says yes exactly where the op runs and no where it raises."""
    dims = m1ops.build_info()["cuda_lightning_head_dims"]
    assert dims == ([64, 128] if m1ops.build_info()["cuda"] else [])
    for K, V in [(1, 1), (16, 16), (64, 64), (128, 128), (64, 128), (257, 8), (8, 257)]:
        q, k, v, slope, _ = make_inputs(1, 9, 2, K, V, torch.float32, device)
        takes = m1ops.lightning.kernel_takes(q, v)
        if takes:
            m1ops.lightning_attn(q, k, v, slope)
        else:
            with pytest.raises(ValueError, match=r"K = V in \{64, 128\}|must be <= 256"):
                m1ops.lightning_attn(q, k, v, slope)
    assert m1ops.lightning.kernel_takes(*(torch.zeros(1, 1, 1, 16, device=device),) * 2) == (device == "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cuda_matches_cpu_kernel(dtype):
    """The CUDA kernels against the CPU kernel on the same inputs (varlen, state, backward)."""
    H, D = 3, 128
    cu = torch.tensor([0, 1, 1, 200, 333])
    q, k, v, slope, s0 = make_inputs(1, 333, H, D, D, dtype, "cpu", N=4)
    do = torch.randn(1, 333, H, D).to(dtype)
    results = {}
    for device in ("cpu", "cuda"):
        leaves = [x.to(device).requires_grad_() for x in (q, k, v, s0)]
        o, final = m1ops.lightning_attn(*leaves[:3], slope.to(device), initial_state=leaves[3],
                                        output_final_state=True, cu_seqlens=cu.to(device))
        grads = torch.autograd.grad([o, final], leaves, [do.to(device), torch.ones_like(final)])
        results[device] = [o, final, *grads]
    tol = TF32_TOL if dtype == torch.float32 else 4 * UNIT_ROUNDOFF[dtype] + ACCUM_TOL
    for name, gpu, cpu in zip(("o", "final", "dq", "dk", "dv", "ds0"), results["cuda"], results["cpu"]):
        assert_rel_close(gpu.cpu(), cpu, tol, name)
