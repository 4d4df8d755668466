"""m1model.ops.linear, the model's projections, against F.linear in float64.

On the CPU it runs oneDNN, and up to 8 rows (32 in fp32 on AVX-512 CPUs) the FP32 head: the shapes
below take both (1, 5, 12, 18 and 40 rows).

Checks values and gradients for every activation, fp32 and bf16, 2-D / 3-D / strided inputs,
that the inference call and the autograd call give bitwise the same values (the RL trainer's
on-policy check relies on it), and the reference switch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close

from m1model import ops

ACTS = {None: lambda z: z, "silu": F.silu, "sigmoid": torch.sigmoid}
# fp32: sums of K = 96 products in another order; bf16: one rounding of the output (2^-8) on top.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


def inputs(shape, K, O, dtype, strided):
    x = torch.randn(*shape, K + (7 if strided else 0))[..., :K].to(dtype)
    w = (torch.randn(O, K) / K**0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", list(ACTS), ids=str)
@pytest.mark.parametrize("shape,strided", [((5,), False), ((2, 9), False), ((3, 4), True), ((1,), True), ((5, 8), False)])
def test_matches_float64_values_and_gradients(dtype, activation, shape, strided):
    x, w = inputs(shape, 96, 130, dtype, strided)
    ref = ACTS[activation](F.linear(x.double(), w.double()))
    with torch.no_grad():
        y_inference = ops.linear(x, w, activation)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.linear(xg, wg, activation)
    assert y.dtype == dtype and y.shape == (*shape, 130)
    assert torch.equal(y.detach(), y_inference), "no_grad and autograd forwards differ"
    assert_rel_close(y, ref, TOL[dtype], "linear")
    g = torch.randn(y.shape, dtype=torch.float64)
    dx, dw = torch.autograd.grad((y * g.to(dtype)).sum(), (xg, wg))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    rdx, rdw = torch.autograd.grad((ACTS[activation](F.linear(x64, w64)) * g).sum(), (x64, w64))
    assert dx.dtype == dtype and dw.dtype == dtype
    assert_rel_close(dx, rdx, 4 * TOL[dtype], "grad x")
    assert_rel_close(dw, rdw, 4 * TOL[dtype], "grad weight")


def test_gradient_of_one_input_only():
    x, w = inputs((6,), 32, 40, torch.float32, False)
    wg = w.clone().requires_grad_()
    (dw,) = torch.autograd.grad(ops.linear(x, wg, "sigmoid").sum(), (wg,))
    w64 = w.double().requires_grad_()
    (rdw,) = torch.autograd.grad(torch.sigmoid(F.linear(x.double(), w64)).sum(), (w64,))
    assert_rel_close(dw, rdw, 4e-5, "grad weight")


def test_reference_switch_and_empty_input():
    x, w = inputs((4,), 16, 8, torch.float32, False)
    with ops.use_reference(True):
        assert torch.equal(ops.linear(x, w, "silu"), F.silu(F.linear(x, w)))
    assert ops.linear(x[:0], w).shape == (0, 8)
