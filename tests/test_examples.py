"""m1ops/examples.py (the README's "Calling the ops from your own model"): it runs, and the
toy model gives the same loss, gradients and decode logits on the kernels (fp32) as on
m1ops.reference (float64) swapped in for every op."""

from __future__ import annotations

import copy

import pytest
import torch

import m1ops
from m1ops import examples
from m1ops import reference as ref
from helpers import assert_rel_close

# fp32 kernels against float64: products of length <= 32 and sums over <= 32 tokens,
# relative rounding ~1e-7 per op, amplified by a few layers and a softmax: 1e-4 leaves
# two orders of margin and still catches any wrong index, scale or missing term.
TOL = 1e-4


def _reference_ops(monkeypatch) -> None:
    """Replace every op the example calls (looked up as m1ops.<name> at call time) by its reference."""

    def lightning_attn(q, k, v, slope, *, scale=1.0, initial_state=None, output_final_state=False,
                       cu_seqlens=None, block_size=None):
        o, final = ref.lightning_attn_ref(q, k, v, slope, scale=scale, initial_state=initial_state,
                                          cu_seqlens=cu_seqlens)
        return o, (final if output_final_state else None)

    def lightning_attn_decode(q, k, v, slope, state, *, scale=1.0):
        o, new_state = ref.lightning_attn_decode_ref(q, k, v, slope, state, scale=scale)
        state.copy_(new_state)
        return o

    monkeypatch.setattr(m1ops, "lightning_attn", lightning_attn)
    monkeypatch.setattr(m1ops, "lightning_attn_decode", lightning_attn_decode)
    monkeypatch.setattr(m1ops, "moe_route", ref.moe_route_ref)
    monkeypatch.setattr(m1ops, "fused_moe", ref.fused_moe_ref)
    monkeypatch.setattr(m1ops, "fp32_logprobs", lambda h, w, t, **kw: ref.fp32_logprobs_ref(h, w, t, **kw)[0])
    monkeypatch.setattr(m1ops, "fp32_logits", ref.fp32_logits_ref)


def test_example_main_runs():
    result = examples.main()
    assert result["grads_finite"]
    assert torch.isfinite(torch.tensor(result["loss"]))
    # Decode continues the prefill's state: the same distribution as one forward (fp32 rounding only).
    assert result["decode_vs_forward_max_logprob_gap"] < 1e-4


def _train_and_decode(model, dtype):
    gen = torch.Generator().manual_seed(3)
    ids, cu = examples.packed([7, 0, 19, 1], model.head.shape[0], gen)  # an empty and a 1-token sequence
    targets = torch.roll(ids[0], -1).clone()
    targets[cu[1:].clamp(min=1) - 1] = -100
    h0 = torch.randn(4, 2, 16, 16, generator=gen).to(dtype).mul_(0.1).requires_grad_()  # carried state
    hidden, final = model.hidden(ids, cu, h0)
    weight = model.head
    logp = m1ops.fp32_logprobs(hidden, weight, targets)
    loss = -logp.sum() + (final * torch.linspace(-1, 1, final.numel(), dtype=final.dtype).view_as(final)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    grads["initial_state"] = h0.grad.clone()

    prompts, cu_p = examples.packed([4, 6], model.head.shape[0], gen)
    logits, state = model.prefill(prompts, cu_p)
    steps = [logits]
    for token in ([3, 5], [11, 0]):
        steps.append(model.decode(torch.tensor(token), state))
    return logp.detach(), final.detach(), grads, torch.stack(steps), state


def test_example_model_matches_the_references(monkeypatch):
    torch.manual_seed(1)
    model = examples.ToyLM()
    model64 = copy.deepcopy(model).double()
    ours = _train_and_decode(model, torch.float32)
    _reference_ops(monkeypatch)
    theirs = _train_and_decode(model64, torch.float64)
    assert_rel_close(ours[0], theirs[0], TOL, "log-probs")
    assert_rel_close(ours[1], theirs[1], TOL, "final lightning state")
    for name, g in ours[2].items():
        assert_rel_close(g, theirs[2][name], TOL, f"grad {name}")
    assert_rel_close(ours[3], theirs[3], TOL, "prefill + decode logits")
    assert_rel_close(ours[4], theirs[4], TOL, "decode state")


@pytest.mark.parametrize("name", ["lightning_attn", "lightning_attn_decode", "moe_route", "fused_moe",
                                  "fp32_logprobs", "fp32_logits"])
def test_example_calls_every_op(name):
    source = open(examples.__file__).read()
    assert f"m1ops.{name}(" in source
