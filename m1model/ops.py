"""The m1 ops as the model calls them, with a switch to their pure-PyTorch references.

    from m1model import ops
    ops.use_reference(True)          # every op below runs its reference from now on
    with ops.use_reference(True):    # ... or only inside the block
        model(ids)
    ops.status()                     # {op: "m1ops" | "reference" | "fallback (...)"}

Fast path: ``m1ops.<name>`` (C++/CUDA kernels). Reference path: the readable
PyTorch implementation of the same math. An op that m1ops does not provide
falls back to its reference with a one-time warning, and status() says so.
Signatures are exactly m1ops' (DESIGN 3).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

import m1ops
from m1ops.reference import torch_ops as _ref

log = logging.getLogger("m1model.ops")

OP_NAMES = ("lightning_attn", "lightning_attn_decode", "moe_route", "fused_moe", "fp32_logprobs", "fp32_logits",
            "rms_norm")

_state = {"reference": False}
_warned: set[str] = set()


class use_reference:
    """Runs every op on its reference (True) or its kernel (False); also a context manager."""

    def __init__(self, enabled: bool = True) -> None:
        self._previous = _state["reference"]
        _state["reference"] = bool(enabled)

    def __enter__(self) -> "use_reference":
        return self

    def __exit__(self, *exc) -> None:
        _state["reference"] = self._previous


def reference_enabled() -> bool:
    return _state["reference"]


def status() -> dict[str, str]:
    """Which implementation each op runs right now."""
    if _state["reference"]:
        return {name: "reference" for name in OP_NAMES}
    return {
        name: "m1ops" if hasattr(m1ops, name) else "fallback (reference: m1ops has no such op yet)"
        for name in OP_NAMES
    }


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _impl(name: str):
    if not _state["reference"]:
        fast = getattr(m1ops, name, None)
        if fast is not None:
            return fast
        _warn_once(name, "m1ops.%s is not available: m1model runs its pure-PyTorch reference instead", name)
    return getattr(_ref, name)


def lightning_attn(q, k, v, slope, *, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None,
                   block_size=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B, T, H, K]; v [B, T, H, V]; slope [H] fp32; states [N, H, K, V] fp32 -> (o [B, T, H, V], final).

    Head dims without a kernel on q's device (CUDA: K = V in {64, 128}) run the reference, with a
    one-time warning."""
    impl = _impl("lightning_attn")
    if impl is not _ref.lightning_attn and not m1ops.lightning.kernel_takes(q, v):
        _warn_once(f"lightning_attn/{q.device.type}/{q.shape[-1]}x{v.shape[-1]}",
                   "m1ops.lightning_attn has no %s kernel for head dims K = %d, V = %d: m1model runs its "
                   "pure-PyTorch reference for them", q.device.type, q.shape[-1], v.shape[-1])
        impl = _ref.lightning_attn
    return impl(
        q, k, v, slope, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, block_size=block_size,
    )


def lightning_attn_decode(q, k, v, slope, state, *, scale=1.0) -> torch.Tensor:
    """q, k [B, H, K]; v [B, H, V]; state [B, H, K, V] fp32 updated in place -> o [B, H, V]."""
    return _impl("lightning_attn_decode")(q, k, v, slope, state, scale=scale)


def moe_route(router_logits, top_k) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int64)."""
    return _impl("moe_route")(router_logits, top_k)


def fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids) -> torch.Tensor:
    """x [T, D]; w_gate_up [E, 2F, D]; w_down [E, D, F]; topk [T, k] -> y [T, D] in x's dtype."""
    return _impl("fused_moe")(x, w_gate_up, w_down, topk_weights, topk_ids)


def fp32_logprobs(hidden, weight, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """hidden [N, D]; weight [V, D]; targets [N] int64 -> logprobs [N] fp32 (, entropy [N])."""
    return _impl("fp32_logprobs")(
        hidden, weight, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )


def fp32_logits(hidden, weight) -> torch.Tensor:
    """hidden [N, D]; weight [V, D] -> logits [N, V] fp32."""
    return _impl("fp32_logits")(hidden, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D]; weight [D] -> x / sqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, times the
    weight. m1ops' one-pass kernel where it applies (a decode step runs 25 norms of one row: one
    op each instead of seven), the reference otherwise (other devices, other dtype pairs)."""
    if not _state["reference"] and m1ops.norm.kernel_takes(x, weight):
        return m1ops.rms_norm(x, weight, eps)
    return _ref.rms_norm(x, weight, eps)


_HAS_MKLDNN = torch.backends.mkldnn.is_available()


def _onednn_linear_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear() may take oneDNN's CPU matmul: eager mode, fp32/bf16 tensors of one dtype on
    the CPU, oneDNN built in."""
    return (
        x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype and x.numel() > 0
        and x.dtype in (torch.float32, torch.bfloat16)
        and not torch.compiler.is_compiling() and _HAS_MKLDNN
    )


@functools.cache
def _head_rows(dtype: torch.dtype) -> int:
    """Rows up to which linear() runs on m1ops.fp32_logits rather than oneDNN.

    Its few-rows kernel (<= 8 rows, csrc/logits kFewRowsHead) wins in both dtypes; above that, in
    fp32 on AVX-512 CPUs, its AVX-512 tiles still beat oneDNN up to 32 rows ([3072, 1024] weight
    out of cache, 2 threads: 390 vs 575 us at 8 rows, 524 vs 704 at 16, 802 vs 868 at 32), while in
    bf16 oneDNN's AVX512-BF16 GEMM is faster from 12 rows (482 vs 295 us).
    """
    return 32 if dtype == torch.float32 and m1ops.build_info().get("cpu_avx512", False) else 8


def _onednn(x: torch.Tensor, weight: torch.Tensor, attr: str) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, attr, [], "")


class _OneDNNLinear(torch.autograd.Function):
    """act(x @ weight^T) by oneDNN, act in {"none", "sigmoid"} (whose derivative comes from the
    output); gradients by torch.matmul. The forward is the very computation of inference, so a
    recomputation under no_grad gives bitwise the same values as the training forward."""

    @staticmethod
    def forward(ctx, x, weight, attr):
        y = _onednn(x, weight, attr)
        ctx.attr = attr
        ctx.save_for_backward(x, weight, y if attr == "sigmoid" else None)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, y = ctx.saved_tensors
        if ctx.attr == "sigmoid":
            g = g * y * (1 - y)
        gx = g @ weight if ctx.needs_input_grad[0] else None
        gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        return gx, gw, None


def linear(x: torch.Tensor, weight: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """act(x @ weight^T): x [..., K]; weight [O, K] -> [..., O] in x's dtype; activation None | "silu" | "sigmoid".

    The model's projections. On the CPU, up to 8 rows (decoding; 32 in fp32 on AVX-512 CPUs, see
    _head_rows) run on m1ops.fp32_logits and more rows on oneDNN (the sigmoid fused into it): the
    MKL sgemm behind F.linear takes its AVX2 path on AMD CPUs and reaches about half of oneDNN's
    AVX-512 rate (63 against 129 GFLOP/s on one core for [4096, 1024] x [1024, 3072];
    bench/profile_model.py shows the share).
    With and without gradients it computes the same values. Under torch.compile, on other devices
    and on the reference switch it is F.linear followed by the activation (the same function up to
    fp32 summation order).
    """
    fast = not _state["reference"] and _onednn_linear_ok(x, weight)
    if fast and x.numel() <= _head_rows(x.dtype) * x.shape[-1]:
        # Decoding (a few rows): a weight-bandwidth-bound GEMV. m1ops' FP32 head reads the weight once
        # as stored with fp32 products and sums (a linear with fp32 accumulation, rounded once to x's
        # dtype): 31 GB/s against oneDNN's 22 GB/s on a [3072, 1024] fp32 weight out of cache.
        y = m1ops.fp32_logits(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
        return _activate(y if y.dtype == x.dtype else y.to(x.dtype), activation)
    if fast:
        attr = "sigmoid" if activation == "sigmoid" else "none"
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            y = _OneDNNLinear.apply(x, weight, attr)
        else:
            y = _onednn(x, weight, attr)
        return _activate(y, "none" if attr == "sigmoid" else activation)
    return _activate(F.linear(x, weight), activation)


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """activation(y) for a y that linear() just made. Without autograd in place: the same values
    without a second [rows, out] buffer (silu after the qkv projection, [4096, 3072] fp32: 85 ->
    73 ms; the new buffer's page faults were the difference)."""
    in_place = not (torch.is_grad_enabled() and y.requires_grad)
    if activation == "silu":
        return F.silu(y, inplace=in_place)
    if activation == "sigmoid":
        return y.sigmoid_() if in_place else torch.sigmoid(y)
    return y
