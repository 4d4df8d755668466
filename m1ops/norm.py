"""RMSNorm (DESIGN 5) as one op: typed wrapper, fake impl and autograd.

Shapes: x [..., D], weight [D].

    r = 1 / sqrt(mean_j x_j^2 + eps)          fp32 (fp64 for float64 x)
    y = round_x(x * r) * weight               rounded to x's dtype, then times the weight

CPU kernel only (csrc/norm): m1model calls it on the CPU, where a decode step
runs 25 norms on one row each and every dispatched op counts.
"""

from __future__ import annotations

import torch

from m1ops._layout import unit_rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' MiniMax RMSNorm in one pass per row.

    Args:
        x:      [..., D] float32, bfloat16 or float16 (float64 too); any strides (rows that are
                not unit-stride are copied first).
        weight: [D] contiguous, x's dtype, or float32 with 16-bit x.
        eps:    added to mean(x^2); finite, >= 0.

    Returns:
        [..., D] in x's dtype (float32 for a float32 weight with 16-bit x): x / sqrt(mean(x^2) + eps)
        computed in fp32 (fp64 for float64), rounded to x's dtype, times weight.

    Differentiable in x and weight (the rounding to x's dtype is taken as the identity).
    """
    return torch.ops.m1.rms_norm(unit_rows(x), weight, eps)


def kernel_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm accepts these (callers with other inputs run a PyTorch formulation): CPU
    tensors (its only kernel), x of at least one dimension, weight in x's dtype or float32 with
    16-bit x."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dim() == 0:
        return False
    if weight.dtype == x.dtype:
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    return weight.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return x.dtype if weight.dtype == x.dtype else torch.float32


@torch.library.register_fake("m1::rms_norm")
def _rms_norm_fake(x, weight, eps):
    torch._check(x.dim() >= 1 and weight.dim() == 1 and weight.shape[0] == x.shape[-1])
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, grad):
    """With n = x r, r = (mean(x^2) + eps)^-1/2 and g_n = grad * w:
    dx = r (g_n - n mean(g_n n)), dw = sum over rows of grad * n (in x's dtype, as the forward)."""
    x, weight = ctx.saved_tensors
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + ctx.eps)
    n = xf * r
    g = grad.to(acc)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        gn = g * weight.to(acc)
        dx = (r * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dw = (g * n.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dw, None


torch.library.register_autograd("m1::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)
