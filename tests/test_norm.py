"""m1.rms_norm against the float64 reference and the PyTorch twin (DESIGN 5).

Tolerances. The kernel computes r = (mean(x^2) + eps)^-1/2 in fp32 and rounds
x r to x's dtype before the weight: against float64 without that rounding the
relative error is a few fp32 roundings in fp32 (DESIGN 4's 1e-5) and about one
unit roundoff of a 16-bit dtype (bf16 2^-8 -> 1e-2, fp16 2^-11 -> 2e-3). Its
rounding order is the twin's (m1ops.reference.torch_ops.rms_norm, transformers'
MiniMaxRMSNorm), so in 16 bits it matches the twin within two ulps per element.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REL_TOL, assert_rel_close, gapped

import m1ops
from m1ops.reference import rms_norm_ref
from m1ops.reference import torch_ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SHAPES = ((0, 8), (1, 1), (3, 7), (1, 1024), (2, 3, 257), (257, 1000))


def inputs(shape, dtype, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(weight_dtype or dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_against_reference_and_twin(shape, dtype):
    x, w = inputs(shape, dtype, seed=len(shape) * 1000 + shape[-1])
    out = m1ops.rms_norm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    assert_rel_close(out, rms_norm_ref(x, w, 1e-6), REL_TOL[dtype], f"{dtype} {shape}")
    twin = torch_ops.rms_norm(x, w, 1e-6)
    if dtype in (torch.bfloat16, torch.float16):
        # Same rounding order; r may differ in its last fp32 bit, which can move x r by one ulp of x's
        # dtype, and that by up to 1.5 ulps (weights in [0.5, 1.5]) before the last rounding: 2 ulps.
        ulp = torch.finfo(dtype).eps * twin.double().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((out.double() - twin.double()).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_float32_weight_gives_float32(dtype):
    x, w = inputs((4, 96), dtype, torch.float32)
    out = m1ops.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32
    # transformers' order: x r rounded to x's dtype, then times the fp32 weight (exact products in fp32)
    torch.testing.assert_close(out, torch_ops.rms_norm(x, w, 1e-5), rtol=2e-7, atol=0)


def test_strided_rows_and_eps():
    base, w = inputs((6, 2 * 64), torch.float32)
    for x in (base[:, :64], base[::2, 64:], gapped(base[:, :64]), base.view(6, 64, 2)[..., 0]):
        assert_rel_close(m1ops.rms_norm(x, w[:64], 0.5), rms_norm_ref(x, w[:64], 0.5), 1e-5, str(x.stride()))
    zeros = torch.zeros(2, 64)  # eps keeps a zero row finite: 0 / sqrt(eps)
    assert torch.equal(m1ops.rms_norm(zeros, w[:64], 1e-6), zeros)


def test_gradients_against_reference():
    x, w = inputs((5, 3, 200), torch.float32)
    x.requires_grad_(True), w.requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    gx, gw = torch.autograd.grad(m1ops.rms_norm(x, w, 1e-6), (x, w), grad)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    rx, rw = torch.autograd.grad(rms_norm_ref(x64, w64, 1e-6), (x64, w64), grad.double())
    assert_rel_close(gx, rx, 1e-5, "dx")
    assert_rel_close(gw, rw, 1e-5, "dw")


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_gradients_16bit_no_worse_than_twin(dtype):
    x, w = inputs((7, 300), dtype)
    x.requires_grad_(True), w.requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(m1ops.rms_norm(x, w, 1e-6), (x, w), grad)
    twin = torch.autograd.grad(torch_ops.rms_norm(x, w, 1e-6), (x, w), grad)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = torch.autograd.grad(rms_norm_ref(x64, w64, 1e-6), (x64, w64), grad.double())
    for name, a, b, r in zip(("dx", "dw"), got, twin, ref):
        assert a.dtype == dtype
        err, twin_err = ((a.double() - r).norm() / r.norm()).item(), ((b.double() - r).norm() / r.norm()).item()
        assert err <= max(2 * twin_err, REL_TOL[dtype]), f"{name}: {err:.2e} vs twin {twin_err:.2e}"


def test_gradcheck_float64():
    x, w = inputs((3, 11), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: m1ops.rms_norm(a, b, 1e-3), (x.requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("dtype,weight_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                (torch.bfloat16, torch.float32), (torch.float64, None)])
def test_opcheck(dtype, weight_dtype):
    x, w = inputs((2, 3, 40), dtype, weight_dtype)
    torch.library.opcheck(torch.ops.m1.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.m1.rms_norm.default, (x.requires_grad_(), w.requires_grad_(), 1e-6))


@pytest.mark.parametrize("make,error,match", [
    (lambda: (torch.randn(2, 8), torch.ones(7), 1e-6), ValueError, r"'weight' must have shape \[D\]"),
    (lambda: (torch.randn(2, 8), torch.ones(2, 8), 1e-6), ValueError, "'weight' must have shape"),
    (lambda: (torch.randn(2, 8).bfloat16(), torch.ones(8, dtype=torch.float16), 1e-6), TypeError, "'weight' must"),
    (lambda: (torch.randn(2, 8), torch.ones(8, dtype=torch.float64), 1e-6), TypeError, "'weight' must"),
    (lambda: (torch.ones(2, 8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), 1e-6), TypeError, "'x' must"),
    (lambda: (torch.tensor(1.0), torch.ones(1), 1e-6), ValueError, "'x' must have at least one dimension"),
    (lambda: (torch.randn(2, 8), torch.ones(8), -1.0), ValueError, "'eps' must be finite and >= 0"),
    (lambda: (torch.randn(2, 8), torch.ones(8), float("nan")), ValueError, "'eps' must be finite"),
    (lambda: (torch.randn(2, 8), torch.ones(16)[::2], 1e-6), ValueError, "'weight' must be contiguous"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        m1ops.rms_norm(*make())


def test_kernel_takes_matches_the_op():
    """m1model runs the op exactly where kernel_takes says yes and the twin elsewhere."""
    from m1model import ops

    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for xd in dtypes:
        for wd in dtypes:
            x, w = torch.randn(3, 16).to(xd), torch.ones(16, dtype=wd)
            takes = m1ops.norm.kernel_takes(x, w)
            try:
                m1ops.rms_norm(x, w, 1e-6)
                ran = True
            except TypeError:
                ran = False
            assert takes == ran, (xd, wd)
            if not takes:
                assert torch.equal(ops.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6))
