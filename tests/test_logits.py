"""m1.fp32_logprobs and m1.fp32_logits against the float64 references (DESIGN 3.3).

Shapes: N tokens, D model dim, V vocabulary.

Tolerances. Results are fp32 computed from fp32 products of the (exactly
widened) inputs, so against float64 on the same values the relative error is a
few fp32 roundings: DESIGN 4's 1e-5. Gradients are accumulated in fp32 and
rounded once to the input's dtype: 1e-5 plus that dtype's unit roundoff
(2^-8 for bf16, 2^-11 for fp16), as in the other ops' tests.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import DEVICES, assert_rel_close, rel_err, with_

import m1ops
from m1ops.reference import fp32_logits_ref, fp32_logprobs_ref

FP32_TOL = 1e-5
UNIT_ROUNDOFF = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
F64_TOL = 1e-12  # float64 inputs: the CPU kernel runs in double


def out_tol(hidden: torch.Tensor) -> float:
    return F64_TOL if hidden.dtype == torch.float64 else FP32_TOL


def grad_tol(t: torch.Tensor) -> float:
    return (F64_TOL if t.dtype == torch.float64 else FP32_TOL) + UNIT_ROUNDOFF[t.dtype]


def make_inputs(N, D, V, device, hdtype=torch.float32, wdtype=None, *, logit_std=3.0, ignore_every=0,
                ignore_index=-100):
    """hidden ~ N(0, 1), weight scaled so that the logits have std ~logit_std."""
    wdtype = wdtype or hdtype
    hidden = torch.randn(N, D, device=device).to(hdtype)
    weight = (torch.randn(V, D, device=device) * (logit_std / max(D, 1) ** 0.5)).to(wdtype)
    targets = torch.randint(0, V, (N,), device=device)
    if ignore_every:
        targets[::ignore_every] = ignore_index
    return hidden, weight, targets


def skip_unsupported(device, *dtypes):
    if device == "cuda" and torch.float64 in dtypes:
        pytest.skip("float64 is a CPU-only dtype (for gradcheck)")


def check_logprobs(hidden, weight, targets, *, temperature=1.0, ignore_index=-100, grads=True):
    """Outputs and both gradients (through logprobs, entropy and lse) against the float64 reference."""
    h = hidden.detach().requires_grad_(grads)
    w = weight.detach().requires_grad_(grads)
    lp, ent, lse = torch.ops.m1.fp32_logprobs(h, w, targets, temperature=temperature, ignore_index=ignore_index)
    h64 = hidden.detach().double().requires_grad_(grads)
    w64 = weight.detach().double().requires_grad_(grads)
    ref_lp, ref_ent, ref_lse = fp32_logprobs_ref(h64, w64, targets, temperature=temperature, ignore_index=ignore_index)
    expected_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    for name, out in (("logprobs", lp), ("entropy", ent), ("lse", lse)):
        assert out.dtype == expected_dtype and out.shape == (hidden.shape[0],) and out.device == hidden.device, name
    tol = out_tol(hidden)
    assert_rel_close(lp, ref_lp, tol, "logprobs")
    assert_rel_close(ent, ref_ent, tol, "entropy")
    assert_rel_close(lse, ref_lse, tol, "lse")
    ignored = targets == ignore_index
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all(), "ignored rows give 0"
    assert (lp[~ignored] <= 0).all(), "a log-probability is <= 0"
    if not grads or hidden.shape[0] == 0:
        return
    g_lp, g_ent, g_lse = (torch.randn(hidden.shape[0], device=hidden.device, dtype=expected_dtype) for _ in range(3))
    dh, dw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum() + (lse * g_lse).sum(), (h, w),
                                 retain_graph=True)
    g64 = [g.double() for g in (g_lp, g_ent, g_lse)]
    rdh, rdw = torch.autograd.grad(
        (ref_lp * g64[0]).sum() + (ref_ent * g64[1]).sum() + (ref_lse * g64[2]).sum(), (h64, w64), retain_graph=True
    )
    assert dh.dtype == hidden.dtype and dw.dtype == weight.dtype
    assert_rel_close(dh, rdh, grad_tol(hidden), "grad hidden")
    assert_rel_close(dw, rdw, grad_tol(weight), "grad weight")
    # Without the lse term: the public wrapper's outputs only.
    dh2, dw2 = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w))
    rdh2, rdw2 = torch.autograd.grad((ref_lp * g64[0]).sum() + (ref_ent * g64[1]).sum(), (h64, w64))
    assert_rel_close(dh2, rdh2, grad_tol(hidden), "grad hidden (logprobs + entropy)")
    assert_rel_close(dw2, rdw2, grad_tol(weight), "grad weight (logprobs + entropy)")


SHAPES = {  # (N, D, V): the N in {1, 17, 1000} x V in {1, 7, 50000}
    f"N={n},V={v}": (n, 48, v) for n in (1, 17, 1000) for v in (1, 7, 50000)
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, device):
    N, D, V = shape
    check_logprobs(*make_inputs(N, D, V, device, ignore_every=5 if N > 1 else 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "hdtype,wdtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
     (torch.float32, torch.bfloat16)],
    ids=["bf16", "fp16", "bf16-hidden-fp32-weight", "fp32-hidden-bf16-weight"],
)
def test_half_inputs_match_float64_of_the_same_values(hdtype, wdtype, device):
    """bf16/fp16 inputs are widened exactly: the result matches float64 on the rounded values to fp32 precision."""
    hidden, weight, targets = make_inputs(300, 96, 5000, device, hdtype, wdtype, ignore_every=7)
    check_logprobs(hidden, weight, targets, temperature=0.9)


@pytest.mark.parametrize("device", DEVICES)
def test_wide_rows_half_weight(device):
    """D = 1100 with a bf16 weight: the CPU backward's vocabulary groups shrink to one block (fp32
    accumulators capped per task) and cover more rounds; the result must not change."""
    hidden, weight, targets = make_inputs(40, 1100, 1500, device, torch.float32, torch.bfloat16)
    check_logprobs(hidden, weight, targets)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature(temperature, device):
    check_logprobs(*make_inputs(65, 40, 3000, device), temperature=temperature)


@pytest.mark.parametrize("device", DEVICES)
def test_ignore_index_inside_the_vocabulary(device):
    """ignore_index may be a real token id (e.g. a pad token): those rows are ignored, others keep it."""
    hidden, weight, targets = make_inputs(50, 16, 30, device)
    targets[::3] = 4
    check_logprobs(hidden, weight, targets, ignore_index=4)
    lp = m1ops.fp32_logprobs(hidden, weight, targets, ignore_index=4)
    assert (lp[targets == 4] == 0).all() and (lp[targets != 4] < 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_ignored_give_zero_gradients(device):
    hidden, weight, targets = make_inputs(9, 8, 20, device)
    targets.fill_(-100)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    lp, ent = m1ops.fp32_logprobs(h, w, targets, return_entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    dh, dw = torch.autograd.grad((lp + ent).sum(), (h, w))
    assert (dh == 0).all() and (dw == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_peaked_rows(device):
    """Logits of magnitude ~100 (peaked rows, entropy near 0): no overflow, entropy still accurate."""
    hidden, weight, targets = make_inputs(40, 32, 2000, device, logit_std=40.0)
    check_logprobs(hidden, weight, targets)


@pytest.mark.parametrize("device", DEVICES)
def test_log_probs_of_every_token_normalise(device):
    """For each row, the log-probs of all V tokens logsumexp to 0 (the kernel's own lse is consistent)."""
    N, D, V = 6, 24, 37
    hidden, weight, _ = make_inputs(N, D, V, device)
    rows = hidden.repeat_interleave(V, 0)  # [N * V, D]
    targets = torch.arange(V, device=device).repeat(N)
    lp = m1ops.fp32_logprobs(rows, weight, targets).view(N, V)
    torch.testing.assert_close(torch.logsumexp(lp.double(), -1), torch.zeros(N, dtype=torch.float64, device=device),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views(device):
    """hidden and weight as row slices of larger buffers, targets strided, gradients expanded."""
    N, D, V = 70, 32, 900
    big_h = torch.randn(N, D + 9, device=device)
    big_w = torch.randn(V, 2 * D, device=device) / D**0.5
    hidden, weight = big_h[:, 3:3 + D], big_w[:, :D]
    targets = torch.randint(0, V, (2 * N,), device=device)[::2]
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not targets.is_contiguous()
    check_logprobs(hidden, weight, targets)
    a = torch.ops.m1.fp32_logprobs(hidden, weight, targets)
    b = torch.ops.m1.fp32_logprobs(hidden.contiguous(), weight.contiguous(), targets.contiguous())
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    # logprobs.sum().backward() hands the kernel an expanded (stride 0) gradient.
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    m1ops.fp32_logprobs(h, w, targets).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    fp32_logprobs_ref(h64, w64, targets)[0].sum().backward()
    assert_rel_close(h.grad, h64.grad, FP32_TOL, "grad hidden of sum()")
    assert_rel_close(w.grad, w64.grad, FP32_TOL, "grad weight of sum()")


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_one_input_only(device):
    """A frozen head (weight without grad) or frozen hidden: only the wanted gradient is computed."""
    hidden, weight, targets = make_inputs(33, 16, 400, device)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = fp32_logprobs_ref(h64, w64, targets)[0].sum()
    rdh, rdw = torch.autograd.grad(ref, (h64, w64))
    h = hidden.clone().requires_grad_()
    m1ops.fp32_logprobs(h, weight, targets).sum().backward()
    assert_rel_close(h.grad, rdh, FP32_TOL, "grad hidden alone")
    w = weight.clone().requires_grad_()
    m1ops.fp32_logprobs(hidden, w, targets).sum().backward()
    assert_rel_close(w.grad, rdw, FP32_TOL, "grad weight alone")
    dh, dw = torch.ops.m1._fp32_logprobs_backward(
        torch.ones(33, device=device), None, None, hidden, weight, targets, *torch.ops.m1.fp32_logprobs(
            hidden, weight, targets)[1:], grad_hidden=False, grad_weight=True)
    assert dh.shape == (0,) and dw.shape == weight.shape


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    hidden, weight, targets = make_inputs(0, 16, 10, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    lp, ent = m1ops.fp32_logprobs(h, w, targets, return_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)
    dh, dw = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
    assert dh.shape == (0, 16) and (dw == 0).all()
    assert m1ops.fp32_logits(h, w).shape == (0, 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_fp32_logits(dtype, device):
    skip_unsupported(device, dtype)
    for N, D, V in [(1, 8, 1), (17, 33, 7), (300, 64, 1000)]:
        hidden, weight, _ = make_inputs(N, D, V, device, dtype)
        h, w = hidden.requires_grad_(), weight.requires_grad_()
        out = m1ops.fp32_logits(h, w)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref = fp32_logits_ref(h64, w64)
        assert_rel_close(out, ref, out_tol(hidden), f"logits N={N} V={V}")
        g = torch.randn(N, V, device=device, dtype=out.dtype)
        dh, dw = torch.autograd.grad((out * g).sum(), (h, w))
        rdh, rdw = torch.autograd.grad((ref * g.double()).sum(), (h64, w64))
        assert_rel_close(dh, rdh, grad_tol(hidden), "logits grad hidden")
        assert_rel_close(dw, rdw, grad_tol(weight), "logits grad weight")
        # The expanded gradient of sum().
        dh_sum, dw_sum = torch.autograd.grad(m1ops.fp32_logits(h, w).sum(), (h, w))
        rdh_sum, rdw_sum = torch.autograd.grad(fp32_logits_ref(h64, w64).sum(), (h64, w64))
        assert_rel_close(dh_sum, rdh_sum, grad_tol(hidden), "logits grad hidden of sum()")
        assert_rel_close(dw_sum, rdw_sum, grad_tol(weight), "logits grad weight of sum()")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fp32_logits_few_rows(wdtype, device):
    """Decoding sizes (N <= 8 rows take a GEMV path on the CPU, N = 9 the tiled GEMM): awkward D and V
    (not multiples of the vector width or the 256-column block), strided hidden rows, 16-bit weights
    used as stored, every row against the float64 product of the same values."""
    for N in (1, 2, 3, 7, 8, 9):
        for D, V in ((37, 300), (256, 513)):
            hidden, weight, _ = make_inputs(N, D, V, device, torch.float32, wdtype)
            wide = torch.randn(N, D + 5, device=device)
            wide[:, :D] = hidden
            view = wide[:, :D]  # row stride D + 5
            for h in (hidden, view, hidden.to(wdtype)):
                out = m1ops.fp32_logits(h, weight)
                assert out.dtype == torch.float32 and out.shape == (N, V)
                assert_rel_close(out, fp32_logits_ref(h.double(), weight.double()), FP32_TOL, f"N={N} D={D} V={V}")


@pytest.mark.parametrize("device", DEVICES)
def test_logits_agree_with_logprobs(device):
    """log_softmax of fp32_logits picks the same log-probs as fp32_logprobs (one fp32 head, two ops)."""
    hidden, weight, targets = make_inputs(40, 64, 3000, device, torch.bfloat16)
    z = m1ops.fp32_logits(hidden, weight) / 0.8
    ref = torch.log_softmax(z.double(), -1).gather(1, targets[:, None])[:, 0]
    lp = m1ops.fp32_logprobs(hidden, weight, targets, temperature=0.8)
    assert_rel_close(lp, ref, FP32_TOL, "logprobs vs log_softmax(fp32_logits)")


def test_gradcheck_float64():
    N, D, V = 5, 4, 7
    hidden = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, -100, 3, 3])

    def head(h, w):
        return torch.ops.m1.fp32_logprobs(h, w, targets, temperature=0.7)

    assert torch.autograd.gradcheck(head, (hidden, weight))
    assert torch.autograd.gradcheck(lambda h, w: m1ops.fp32_logits(h, w), (hidden, weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype, device):
    skip_unsupported(device, dtype)
    for N, D, V in [(6, 8, 11), (1, 1, 1), (0, 4, 3)]:
        hidden, weight, targets = make_inputs(N, D, V, device, dtype)
        if N > 2:
            targets[2] = -100
        hidden.requires_grad_()
        weight.requires_grad_()
        torch.library.opcheck(torch.ops.m1.fp32_logprobs.default, (hidden, weight, targets),
                              {"temperature": 0.5, "ignore_index": -100})
        torch.library.opcheck(torch.ops.m1.fp32_logits.default, (hidden, weight))
        lp, ent, lse = torch.ops.m1.fp32_logprobs(hidden.detach(), weight.detach(), targets)
        g = torch.randn_like(lp)
        torch.library.opcheck(torch.ops.m1._fp32_logprobs_backward.default,
                              (g, None, g, hidden.detach(), weight.detach(), targets, ent, lse),
                              {"temperature": 0.5, "grad_weight": N % 2 == 0})
        torch.library.opcheck(torch.ops.m1._fp32_logits_backward.default,
                              (torch.randn(N, V, device=device, dtype=lp.dtype), hidden.detach(), weight.detach()))


def test_fake_impl_shapes():
    hidden = torch.empty(5, 8, device="meta", dtype=torch.bfloat16)
    weight = torch.empty(11, 8, device="meta", dtype=torch.float32)
    targets = torch.empty(5, device="meta", dtype=torch.int64)
    lp, ent = m1ops.fp32_logprobs(hidden, weight, targets, return_entropy=True)
    assert lp.shape == ent.shape == (5,) and lp.dtype == torch.float32 and lp.device.type == "meta"
    out = m1ops.fp32_logits(hidden, weight)
    assert out.shape == (5, 11) and out.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """An RL-style loss (CISPO-like weights on log-probs plus an entropy bonus) and a sampling step
    compile into one graph each, forward and backward."""
    N, D, V = 24, 16, 300
    hidden, weight, targets = make_inputs(N, D, V, device, ignore_every=6)
    weights = torch.rand(N, device=device)

    def loss_fn(h, w):
        lp, ent = m1ops.fp32_logprobs(torch.nn.functional.silu(h), w, targets, temperature=0.9, return_entropy=True)
        return -(weights * lp).sum() - 0.01 * ent.mean()

    def sample_fn(h, w):
        return torch.softmax(m1ops.fp32_logits(h, w) / 0.7, -1).argmax(-1)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = loss_fn(h1, w1)
    eager.backward()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)(h2, w2)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.compile(sample_fn, fullgraph=True)(hidden, weight), sample_fn(hidden, weight))


def _bad_cases():
    """(id, mutate(args) -> args, exception type, message fragment)."""

    def target(i, value):
        def f(a):
            t = a["targets"].clone()
            t[i] = value
            return t

        return f

    return [
        ("target-V", with_(targets=target(3, 11)), IndexError, "targets[3] = 11"),
        ("target-negative", with_(targets=target(0, -1)), IndexError, "'targets' must be in [0, V) = [0, 11)"),
        ("target-huge", with_(targets=target(5, 2**40)), IndexError, "targets[5] = 1099511627776"),
        ("target-other-ignore", with_(targets=target(1, -100), ignore_index=lambda a: -1), IndexError,
         "or equal ignore_index = -1"),
        ("targets-int32", with_(targets=lambda a: a["targets"].int()), TypeError, "'targets' must be Long"),
        ("targets-len", with_(targets=lambda a: a["targets"][:-1]), ValueError, "'targets' must have shape [N]"),
        ("targets-2d", with_(targets=lambda a: a["targets"][:, None]), ValueError, "'targets' must be 1-D"),
        ("hidden-1d", with_(hidden=lambda a: a["hidden"][0]), ValueError, "'hidden' must be 2-D"),
        ("weight-D", with_(weight=lambda a: a["weight"][:, :-1]), ValueError, "'weight' must have shape [V, D]"),
        ("weight-empty", with_(weight=lambda a: a["weight"][:0]), ValueError, "at least one row"),
        ("hidden-int", with_(hidden=lambda a: a["hidden"].int()), TypeError, "'hidden' must be float32, bfloat16"),
        ("float64-mixed", with_(hidden=lambda a: a["hidden"].double()), TypeError, "float64 is supported only when both"),
        ("weight-overlapping-rows", with_(weight=lambda a: a["weight"][:1].expand(11, 8)), ValueError,
         "'weight' rows overlap"),
        ("temperature-0", with_(temperature=lambda a: 0.0), ValueError, "'temperature' must be a finite number > 0"),
        ("temperature-nan", with_(temperature=lambda a: float("nan")), ValueError, "'temperature' must be"),
    ]


@pytest.mark.parametrize("name,mutate,exc,fragment", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_clear_errors(name, mutate, exc, fragment):
    hidden, weight, targets = make_inputs(7, 8, 11, "cpu")
    args = mutate(dict(hidden=hidden, weight=weight, targets=targets, temperature=1.0, ignore_index=-100))
    with pytest.raises(exc, match=re.escape(fragment)) as info:
        m1ops.fp32_logprobs(**args)
    assert "m1.fp32_logprobs" in str(info.value)


def test_bad_logits_inputs():
    with pytest.raises(ValueError, match=re.escape("m1.fp32_logits: 'weight' must have shape [V, D]")):
        m1ops.fp32_logits(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(TypeError, match="m1.fp32_logits: 'weight' must be float32"):
        m1ops.fp32_logits(torch.randn(3, 4), torch.randn(5, 4).long())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_validates_targets():
    hidden, weight, targets = make_inputs(200, 64, 5000, "cpu", torch.bfloat16, ignore_every=9)
    cpu = torch.ops.m1.fp32_logprobs(hidden, weight, targets, temperature=0.8)
    gpu = torch.ops.m1.fp32_logprobs(hidden.cuda(), weight.cuda(), targets.cuda(), temperature=0.8)
    for c, g in zip(cpu, gpu):
        assert rel_err(g, c) <= 2 * FP32_TOL
    bad = targets.cuda()
    bad[17] = 5000
    with pytest.raises(IndexError, match=re.escape("targets[17] = 5000")):
        torch.ops.m1.fp32_logprobs(hidden.cuda(), weight.cuda(), bad)
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        torch.ops.m1.fp32_logprobs(hidden.cuda(), weight, targets.cuda())
