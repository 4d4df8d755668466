"""m1.lightning_attn_decode against the float64 references (DESIGN 3.1).

Shapes: B batch, H heads, K key dim, V value dim, T tokens.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import DEVICES, assert_rel_close, with_

import m1ops
from m1ops.reference import lightning_attn_decode_ref, lightning_attn_recurrent_ref, lightning_attn_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = {  # (B, H, K, V)
    "B=1,H=1,K=V=1": (1, 1, 1, 1),
    "B=2,H=3,K=16,V=24": (2, 3, 16, 24),
    "B=1,H=64,K=V=128": (1, 64, 128, 128),
    "B=3,H=2,K=80,V=48": (3, 2, 80, 48),
    "B=2,H=2,K=256,V=200": (2, 2, 256, 200),
    "B=2,H=2,K=7,V=13": (2, 2, 7, 13),
    "B=0": (0, 4, 16, 16),
    "K=0": (2, 2, 0, 8),
}

# Unit roundoff of the output dtype: o is computed in fp32 (fp64 for float64
# inputs) and rounded once, so its relative error is at most this plus the
# accumulation error, which over K <= 256 terms in fp32 stays below 1e-5.
UNIT_ROUNDOFF = {torch.float64: 0.0, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ACCUM_TOL = 1e-5
STATE_TOL = 1e-6  # the state is fp32: one rounding per step, relative ~6e-8


def make_inputs(B, H, K, V, dtype, device, state_dtype=torch.float32):
    q = torch.randn(B, H, K, device=device).to(dtype)
    k = torch.randn(B, H, K, device=device).to(dtype)
    v = torch.randn(B, H, V, device=device).to(dtype)
    # MiniMax slopes: 2^(-8 h / H)-style rates spanning fast and slow heads.
    slope = torch.rand(H, device=device) * 0.9 + 0.01
    state = torch.randn(B, H, K, V, device=device, dtype=state_dtype)
    return q, k, v, slope, state


def skip_unsupported(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only dtype (for gradcheck); CUDA kernels take fp32/bf16/fp16")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype, device):
    skip_unsupported(device, dtype)
    q, k, v, slope, state = make_inputs(*shape, dtype, device)
    ref_o, ref_state = lightning_attn_decode_ref(q, k, v, slope, state, scale=0.75)
    ptr = state.data_ptr()
    o = m1ops.lightning_attn_decode(q, k, v, slope, state, scale=0.75)
    assert o.dtype == v.dtype and o.device == v.device and o.is_contiguous()
    assert state.data_ptr() == ptr, "state must be updated in place"
    assert_rel_close(o, ref_o, UNIT_ROUNDOFF[dtype] + ACCUM_TOL, "o")
    assert_rel_close(state, ref_state, STATE_TOL, "state")


@pytest.mark.parametrize("device", DEVICES)
def test_float64_state_is_exact_to_fp64(device):
    """float64 inputs with a float64 state: the CPU kernel runs entirely in double."""
    if device == "cuda":
        pytest.skip("float64 is CPU-only")
    q, k, v, slope, state = make_inputs(2, 3, 32, 40, torch.float64, device, state_dtype=torch.float64)
    ref_o, ref_state = lightning_attn_decode_ref(q, k, v, slope, state)
    o = m1ops.lightning_attn_decode(q, k, v, slope, state)
    assert_rel_close(o, ref_o, 1e-13, "o")
    assert_rel_close(state, ref_state, 1e-13, "state")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_qkv_views(dtype, device):
    """q, k, v as slices of one fused projection (how the model produces them)."""
    B, H, K, V = 3, 4, 32, 48
    qkv = torch.randn(B, H, 2 * K + V, device=device).to(dtype)
    q, k, v = qkv.split([K, K, V], dim=-1)
    assert not q.is_contiguous()
    slope = torch.rand(H, device=device)
    state = torch.randn(B, H, K, V, device=device)
    state_c = state.clone()
    o = m1ops.lightning_attn_decode(q, k, v, slope, state)
    o_c = m1ops.lightning_attn_decode(q.contiguous(), k.contiguous(), v.contiguous(), slope, state_c)
    torch.testing.assert_close(o, o_c, rtol=0, atol=0)
    torch.testing.assert_close(state, state_c, rtol=0, atol=0)

    # A batch-strided slice of a larger batch works too.
    big = torch.randn(2 * B, H, K, device=device).to(dtype)
    m1ops.lightning_attn_decode(big[::2], big[1::2], v, slope, state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_repeated_decode_equals_prefill(dtype, device):
    """T decode steps from an initial state reproduce the closed-form prefill
    (every output and the final state), i.e. decoding is the recurrence."""
    skip_unsupported(device, dtype)
    B, T, H, K, V = 2, 63, 3, 32, 24
    q = torch.randn(B, T, H, K, device=device).to(dtype)
    k = torch.randn(B, T, H, K, device=device).to(dtype) / K**0.5
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    slope = torch.tensor([0.01, 0.1, 1.0], device=device)
    s0 = torch.randn(B, H, K, V, device=device)
    ref_o, ref_final = lightning_attn_ref(q, k, v, slope, scale=0.5, initial_state=s0)

    state = s0.clone()
    outs = [m1ops.lightning_attn_decode(q[:, t], k[:, t], v[:, t], slope, state, scale=0.5) for t in range(T)]
    o = torch.stack(outs, dim=1)
    # The fp32 state is rounded once per step: after T steps its error grows ~sqrt(T).
    assert_rel_close(o, ref_o, UNIT_ROUNDOFF[dtype] + T**0.5 * STATE_TOL + ACCUM_TOL, "o over T steps")
    assert_rel_close(state, ref_final, T**0.5 * STATE_TOL, "final state")


def test_references_agree():
    """The closed form and the token loop are independent derivations of the same math."""
    B, T, H, K, V = 2, 37, 3, 8, 5
    q, k = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, K, dtype=torch.float64)
    v = torch.randn(B, T, H, V, dtype=torch.float64)
    slope = torch.tensor([0.0, 0.3, 2.0])
    s0 = torch.randn(B, H, K, V, dtype=torch.float64)
    o1, f1 = lightning_attn_ref(q, k, v, slope, scale=0.3, initial_state=s0)
    o2, f2 = lightning_attn_recurrent_ref(q, k, v, slope, scale=0.3, initial_state=s0)
    assert_rel_close(o1, o2, 1e-12, "o")
    assert_rel_close(f1, f2, 1e-12, "final state")
    # Varlen: packed segments (one empty) equal separate sequences.
    cu = torch.tensor([0, 10, 10, 37])
    qp, kp, vp = (x[:1] for x in (q, k, v))
    s0p = torch.randn(3, H, K, V, dtype=torch.float64)
    o3, f3 = lightning_attn_ref(qp, kp, vp, slope, initial_state=s0p, cu_seqlens=cu)
    o4, f4 = lightning_attn_recurrent_ref(qp, kp, vp, slope, initial_state=s0p, cu_seqlens=cu)
    assert_rel_close(o3, o4, 1e-12, "varlen o")
    assert_rel_close(f3, f4, 1e-12, "varlen final state")
    torch.testing.assert_close(f3[1], s0p[1])  # an empty segment passes its state through


def _bad_cases():
    """(id, mutate(args) -> args, exception type, message fragment)."""

    return [
        ("q-2d", with_(q=lambda a: a["q"][0]), ValueError, "'q' must be 3-D"),
        ("k-shape", with_(k=lambda a: a["k"][:, :, :-1]), ValueError, "'k' must have shape"),
        ("v-batch", with_(v=lambda a: a["v"][:1]), ValueError, "'v' must have shape"),
        ("slope-len", with_(slope=lambda a: a["slope"][:-1]), ValueError, "'slope' must have shape [H]"),
        ("slope-dtype", with_(slope=lambda a: a["slope"].double()), TypeError, "'slope' must be Float"),
        ("state-shape", with_(state=lambda a: a["state"][..., :-1]), ValueError, "'state' must have shape"),
        ("state-dtype", with_(state=lambda a: a["state"].bfloat16()), TypeError, "'state' must be float32"),
        ("state-f64-with-f32", with_(state=lambda a: a["state"].double()), TypeError, "'state' must be float32"),
        ("state-transposed", with_(state=lambda a: a["state"].transpose(0, 1)), ValueError, "'state' must have shape"),
        (
            "state-noncontig",
            with_(state=lambda a: torch.empty(2, 3, 16, 48)[..., ::2].copy_(a["state"])),
            ValueError,
            "'state' must be contiguous",
        ),
        ("q-int", with_(q=lambda a: a["q"].int()), TypeError, "'q' must be float32, bfloat16 or float16"),
        ("k-dtype", with_(k=lambda a: a["k"].half()), TypeError, "'k' must be Float"),
    ]


@pytest.mark.parametrize("name,mutate,exc,fragment", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_clear_errors(name, mutate, exc, fragment):
    q, k, v, slope, state = make_inputs(2, 3, 16, 24, torch.float32, "cpu")
    args = mutate(dict(q=q, k=k, v=v, slope=slope, state=state))
    before = state.clone()
    with pytest.raises(exc, match=re.escape(fragment)) as info:
        m1ops.lightning_attn_decode(**args)
    assert "m1.lightning_attn_decode" in str(info.value)  # the error names the op
    torch.testing.assert_close(state, before, rtol=0, atol=0)  # nothing was touched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a CUDA device")
def test_mixed_devices_raise():
    q, k, v, slope, state = make_inputs(2, 3, 16, 24, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        m1ops.lightning_attn_decode(q, k, v, slope.cpu(), state)
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        m1ops.lightning_attn_decode(q, k, v, slope, state.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype, device):
    skip_unsupported(device, dtype)
    for shape in [(2, 3, 16, 24), (1, 1, 1, 1), (0, 2, 4, 4)]:
        q, k, v, slope, state = make_inputs(*shape, dtype, device)
        torch.library.opcheck(torch.ops.m1.lightning_attn_decode.default, (q, k, v, slope, state), {"scale": 0.5})


def test_fake_impl_shapes():
    q, k, v, slope, state = (t.to("meta") for t in make_inputs(2, 3, 16, 24, torch.bfloat16, "cpu"))
    o = m1ops.lightning_attn_decode(q, k, v, slope, state)
    assert o.shape == (2, 3, 24) and o.dtype == torch.bfloat16 and o.device.type == "meta"


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """Several decode steps with surrounding torch ops compile into one graph."""
    B, H, K, V, steps = 2, 4, 16, 32, 3
    xs = torch.randn(steps, B, H, 2 * K + V, device=device)
    slope = torch.rand(H, device=device)
    s0 = torch.randn(B, H, K, V, device=device)

    def decode_steps(xs, slope, state):
        outs = []
        for x in xs:
            q, k, v = torch.nn.functional.silu(x).split([K, K, V], dim=-1)
            outs.append(m1ops.lightning_attn_decode(q, k, v, slope, state) * 2)
        return torch.stack(outs)

    state_eager, state_compiled = s0.clone(), s0.clone()
    eager = decode_steps(xs, slope, state_eager)
    torch._dynamo.reset()
    compiled = torch.compile(decode_steps, fullgraph=True)(xs, slope, state_compiled)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_compiled, state_eager, rtol=1e-5, atol=1e-5)
