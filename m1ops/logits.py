"""FP32 logits head (DESIGN 3.3): typed wrappers, fake impls and autograd.

Shapes: N tokens, D model dim, V vocabulary.

    z = hidden @ weight^T / temperature        [N, V], IEEE fp32 products whatever the input dtype
    logprob = z[n, t_n] - logsumexp(z[n])      per token, for the target t_n
    entropy = -sum_j p_nj log p_nj             p = softmax(z)

The log-prob ops never materialise z: the kernels compute it tile by tile with
an online log-sum-exp, and the backward recomputes the tiles.
"""

from __future__ import annotations

import torch

from m1ops._layout import dense, unit_rows


def fp32_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (and entropies) of an LM head in fp32, without [N, V] logits.

    Args:
        hidden:  [N, D] float32, bfloat16 or float16 (float64 on the CPU); any strides (rows
                 that are not unit-stride are copied first).
        weight:  [V, D] any of those dtypes (may differ from hidden's; float64 only with float64
                 hidden); any strides, as hidden. bf16/fp16 values are widened to fp32 exactly.
        targets: [N] int64; each in [0, V) or equal to ignore_index.
        temperature: z = hidden @ weight^T / temperature (> 0).
        ignore_index: rows with this target give log-prob 0 and entropy 0, and no gradient.
        return_entropy: also return the entropy of each row's distribution.

    Returns:
        logprobs: [N] float32 (float64 for float64 inputs), z[n, t_n] - logsumexp(z[n]);
        entropy:  [N] same dtype, -sum p log p (only with return_entropy=True).

    Differentiable in hidden and weight (through both outputs). A target outside
    [0, V) that is not ignore_index raises IndexError before anything runs.
    """
    logprobs, entropy, _lse = torch.ops.m1.fp32_logprobs(
        unit_rows(hidden), unit_rows(weight), dense(targets), temperature=temperature, ignore_index=ignore_index
    )
    return (logprobs, entropy) if return_entropy else logprobs


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T with IEEE fp32 products and sums whatever the input dtype.

    Args:
        hidden: [N, D], weight: [V, D] (dtypes as for fp32_logprobs).

    Returns:
        logits: [N, V] float32 (float64 for float64 inputs). For sampling the last
        positions; use fp32_logprobs when only the targets' log-probs are needed.

    Differentiable in hidden and weight.
    """
    return torch.ops.m1.fp32_logits(unit_rows(hidden), unit_rows(weight))


def _result_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.register_fake("m1::fp32_logprobs")
def _fp32_logprobs_fake(hidden, weight, targets, *, temperature=1.0, ignore_index=-100):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1])
    n = hidden.shape[0]
    dtype = _result_dtype(hidden)
    return tuple(hidden.new_empty((n,), dtype=dtype) for _ in range(3))


@torch.library.register_fake("m1::_fp32_logprobs_backward")
def _fp32_logprobs_backward_fake(grad_logprobs, grad_entropy, grad_lse, hidden, weight, targets, entropy, lse, *,
                                 temperature=1.0, ignore_index=-100, grad_hidden=True, grad_weight=True):
    dh = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    dw = weight.new_empty(weight.shape if grad_weight else (0,))
    return dh, dw


@torch.library.register_fake("m1::fp32_logits")
def _fp32_logits_fake(hidden, weight):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and weight.shape[1] == hidden.shape[1])
    return hidden.new_empty((hidden.shape[0], weight.shape[0]), dtype=_result_dtype(hidden))


@torch.library.register_fake("m1::_fp32_logits_backward")
def _fp32_logits_backward_fake(grad_logits, hidden, weight, *, grad_hidden=True, grad_weight=True):
    dh = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    dw = weight.new_empty(weight.shape if grad_weight else (0,))
    return dh, dw


def _fp32_logprobs_setup(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, targets = inputs
    _logprobs, entropy, lse = output
    ctx.save_for_backward(hidden, weight, targets, entropy, lse)
    ctx.temperature = keyword_only_inputs["temperature"]
    ctx.ignore_index = keyword_only_inputs["ignore_index"]


def _fp32_logprobs_backward(ctx, grad_logprobs, grad_entropy, grad_lse):
    hidden, weight, targets, entropy, lse = ctx.saved_tensors
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = torch.ops.m1._fp32_logprobs_backward(
        grad_logprobs, grad_entropy, grad_lse, hidden, weight, targets, entropy, lse,
        temperature=ctx.temperature, ignore_index=ctx.ignore_index, grad_hidden=want_h, grad_weight=want_w,
    )
    return (dh if want_h else None), (dw if want_w else None), None


def _fp32_logits_setup(ctx, inputs, output):
    hidden, weight = inputs
    ctx.save_for_backward(hidden, weight)


def _fp32_logits_backward(ctx, grad_logits):
    hidden, weight = ctx.saved_tensors
    want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = torch.ops.m1._fp32_logits_backward(grad_logits, hidden, weight, grad_hidden=want_h, grad_weight=want_w)
    return (dh if want_h else None), (dw if want_w else None)


torch.library.register_autograd("m1::fp32_logprobs", _fp32_logprobs_backward, setup_context=_fp32_logprobs_setup)
torch.library.register_autograd("m1::fp32_logits", _fp32_logits_backward, setup_context=_fp32_logits_setup)
