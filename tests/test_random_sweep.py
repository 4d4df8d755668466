"""Random combinations of shapes, dtypes, layouts and options, every op against its float64 reference.

The per-op test files walk fixed grids; this file draws the combinations those grids do not
list (varlen with empty segments + initial state + odd block sizes + strided inputs + fp16, an
expert hit by every token with k = 4, ...). Each case is drawn from its own seed, so a failure
names a case that reproduces: `pytest tests/test_random_sweep.py -k "lightning and 17"`.

Tolerance, per tensor: the DESIGN bound for the dtype (helpers.REL_TOL) or, for bf16/fp16
inputs, twice the error of the same formula evaluated in that dtype by PyTorch (DESIGN 4's
alternative, the flash-attention rule), whichever is larger. The reduction lengths (K, D, F)
are drawn from 16 up: with 1-8 terms a sum can cancel to near zero and no fixed relative bound
holds for any implementation (the fixed grids cover those sizes with exact checks).
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import REL_TOL, gapped, rel_err, transposed

import m1ops
from m1ops.reference.lightning import lightning_attn_decode_ref, lightning_attn_ref
from m1ops.reference.logits import fp32_logits_ref, fp32_logprobs_ref
from m1ops.reference.moe import fused_moe_ref

CASES = 40
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float64]


def strided(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """The same values in one of three layouts: dense, column-major in the first two dims, or
    every other element of a wider buffer along the last dim."""
    kind = rng.choice(["dense", "transposed", "gapped"])
    if t.dim() < 2 or t.numel() == 0 or kind == "dense":
        return t
    return transposed(t, (0, 1)) if kind == "transposed" else gapped(t)


def check(what: str, out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor | None, dtype) -> None:
    tol = REL_TOL[dtype]
    if same_dtype is not None and dtype in (torch.bfloat16, torch.float16):
        tol = max(tol, 2 * rel_err(same_dtype, ref64))
    err = rel_err(out, ref64)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def grads(outputs, inputs, cotangents):
    """Gradients of sum(<output, cotangent>) for the inputs that require them (None elsewhere)."""
    wanted = [x for x in inputs if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(outputs, wanted, cotangents))
    return [next(got) if x is not None and x.requires_grad else None for x in inputs]


@pytest.mark.parametrize("case", range(CASES))
def test_lightning(case):
    rng = random.Random(1000 + case)
    torch.manual_seed(1000 + case)
    dt = rng.choice(DTYPES)
    H, K, V = rng.randint(1, 4), rng.choice([16, 32, 48, 64, 100, 128]), rng.choice([16, 24, 64, 128, 160])
    if rng.random() < 0.4:  # varlen: one row of segments, some empty
        lens = [rng.choice([0, 1, 63, 64, 65, rng.randint(1, 300)]) for _ in range(rng.randint(1, 5))]
        B, T, N = 1, sum(lens), len(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=rng.choice([torch.int32, torch.int64]))
    else:
        B, T, cu = rng.randint(1, 3), rng.choice([1, 2, 63, 64, 65, 257, rng.randint(1, 600)]), None
        N = B
    block = rng.choice([None, 1, 7, 64, 100, 256])
    scale = rng.choice([1.0, K**-0.5])
    q, k = ((torch.randn(B, T, H, K) * 0.3).to(dt) for _ in range(2))
    v = torch.randn(B, T, H, V).to(dt)
    slope = torch.rand(H) * rng.choice([0.0, 0.05, 1.0])
    state_dt = torch.float64 if dt == torch.float64 else torch.float32
    init = torch.randn(N, H, K, V, dtype=state_dt) if rng.random() < 0.5 else None
    args = [strided(x, rng).requires_grad_() for x in (q, k, v)] + [None if init is None else init.clone().requires_grad_()]

    o, final = m1ops.lightning_attn(*args[:3], slope, scale=scale, initial_state=args[3], output_final_state=True,
                                    cu_seqlens=cu, block_size=block)
    assert o.dtype == dt and o.shape == (B, T, H, V) and final.dtype == state_dt and final.shape == (N, H, K, V)
    exact = [x.detach().double().requires_grad_() if x is not None else None for x in args]
    ro, rf = lightning_attn_ref(*exact[:3], slope, scale=scale, initial_state=exact[3], cu_seqlens=cu)
    low = [x.detach().to(dt).requires_grad_() if x is not None else None for x in args[:3]] + [exact[3]]
    lo, lf = lightning_attn_ref(*low[:3], slope, scale=scale, initial_state=low[3], cu_seqlens=cu, dtype=dt)
    check("o", o, ro, lo, dt)
    check("final_state", final, rf, None, state_dt)
    if T == 0:
        return
    # Cotangents drawn in the dtypes the op returns, so that the reference sees the same values.
    go, gf = torch.randn(ro.shape).to(dt), torch.randn(rf.shape).to(state_dt)
    ours = grads((o, final), args, (go, gf))
    ref = grads((ro, rf), exact, (go.double(), gf.double()))
    same = grads((lo, lf), low, (go, gf.to(dt)))
    for name, a, b, c in zip(("dq", "dk", "dv", "d_initial_state"), ours, ref, same):
        if a is not None:
            check(name, a, b, c, a.dtype)


@pytest.mark.parametrize("case", range(CASES // 2))
def test_lightning_decode(case):
    rng = random.Random(2000 + case)
    torch.manual_seed(2000 + case)
    dt = rng.choice(DTYPES)
    B, H, K, V = rng.randint(1, 9), rng.randint(1, 8), rng.choice([16, 64, 128, 256]), rng.choice([16, 64, 128])
    q, k, v = torch.randn(B, H, K).to(dt), torch.randn(B, H, K).to(dt), torch.randn(B, H, V).to(dt)
    slope = torch.rand(H)
    state_dt = torch.float64 if dt == torch.float64 else torch.float32
    state = torch.randn(B, H, K, V, dtype=state_dt)
    ro, rs = lightning_attn_decode_ref(q, k, v, slope, state, scale=0.7)
    lo, _ = lightning_attn_decode_ref(q, k, v, slope, state, scale=0.7, dtype=dt)
    o = m1ops.lightning_attn_decode(strided(q, rng), strided(k, rng), strided(v, rng), slope, state, scale=0.7)
    check("o", o, ro, lo, dt)
    check("state", state, rs, None, state_dt)


@pytest.mark.parametrize("case", range(CASES))
def test_fused_moe(case):
    rng = random.Random(3000 + case)
    torch.manual_seed(3000 + case)
    dt = rng.choice(DTYPES)
    T, E = rng.choice([0, 1, 7, 64, rng.randint(1, 400)]), rng.choice([1, 2, 8, 32, 33])
    k = rng.randint(1, min(E, 4))
    D, F = rng.choice([16, 31, 64, 130]), rng.choice([16, 32, 96, 200])
    x = torch.randn(T, D).to(dt)
    w_gate_up = (torch.randn(E, 2 * F, D) * D**-0.5).to(dt)
    w_down = (torch.randn(E, D, F) * F**-0.5).to(dt)
    logits = torch.randn(T, E)
    if rng.random() < 0.25:
        logits[:, E - 1] += 50.0  # every token picks the last expert
    weights, ids = m1ops.moe_route(logits, k)
    args = [strided(t, rng).requires_grad_() for t in (x, w_gate_up, w_down, weights)]

    y = m1ops.fused_moe(*args, ids)
    assert y.dtype == dt and y.shape == (T, D)
    exact = [t.detach().double().requires_grad_() for t in args]
    ry = fused_moe_ref(*exact, ids)
    low = [t.detach().to(dt).requires_grad_() for t in args[:3]] + [args[3].detach().clone().requires_grad_()]
    ly = fused_moe_ref(*low, ids, dtype=dt)
    check("y", y, ry, ly, dt)
    if T == 0:
        return
    gy = torch.randn(T, D).to(dt)
    ours = grads(y, args, gy)
    ref = grads(ry, exact, gy.double())
    same = grads(ly, low, gy)
    for name, a, b, c in zip(("dx", "dw_gate_up", "dw_down", "dtopk_weights"), ours, ref, same):
        check(name, a, b, c, dt)


@pytest.mark.parametrize("case", range(CASES))
def test_fp32_logprobs(case):
    rng = random.Random(4000 + case)
    torch.manual_seed(4000 + case)
    dt = rng.choice(DTYPES)
    # N from 2 to 8 takes the few-rows kernels (decoding), 17 and more the tiled ones.
    N = rng.choice([0, 1, rng.randint(2, 8), 17, rng.randint(1, 300)])
    V, D = rng.choice([1, 7, 1000, rng.randint(1, 5000)]), rng.choice([16, 33, 256])
    temperature, with_entropy = rng.choice([1.0, 0.7, 2.5]), rng.random() < 0.5
    hidden, weight = torch.randn(N, D).to(dt), (torch.randn(V, D) * D**-0.5).to(dt)
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < 0.2] = -100
    args = [strided(t, rng).requires_grad_() for t in (hidden, weight)]
    out = m1ops.fp32_logprobs(*args, targets, temperature=temperature, return_entropy=with_entropy)
    logp, ent = out if with_entropy else (out, None)
    # Products are IEEE fp32 whatever the input dtype: the bound is fp32's (fp64's for fp64 inputs).
    out_dt = torch.float64 if dt == torch.float64 else torch.float32
    assert logp.dtype == out_dt and logp.shape == (N,)
    exact = [t.detach().double().requires_grad_() for t in args]
    rl, re, _ = fp32_logprobs_ref(*exact, targets, temperature=temperature)
    check("logprobs", logp, rl, None, out_dt)
    if with_entropy:
        check("entropy", ent, re, None, out_dt)
    z = m1ops.fp32_logits(hidden, weight)
    check("logits", z, fp32_logits_ref(hidden, weight), None, out_dt)
    if N == 0:
        return
    g1, g2 = torch.randn(N).to(out_dt), torch.randn(N).to(out_dt)
    ours = grads([logp] + ([ent] if with_entropy else []), args, [g1] + ([g2] if with_entropy else []))
    ref = grads([rl] + ([re] if with_entropy else []), exact, [g1.double()] + ([g2.double()] if with_entropy else []))
    # Gradients come back in the input dtype: one rounding on top of the fp32 computation.
    for name, a, b in zip(("dhidden", "dweight"), ours, ref):
        if V == 1:
            # log p = 0 and entropy = 0 for every row, so the exact gradient is zero and no relative
            # bound applies; the backward's recomputed logit differs from the forward's by a rounding,
            # so 1 - p is an fp32 rounding: bound it against the size of the terms it multiplies.
            terms = max(hidden.abs().max().item(), weight.abs().max().item()) / temperature
            scale = terms * (g1.abs().sum() + g2.abs().sum()).item()
            assert a.abs().max().item() <= 1e-5 * scale, f"{name}: {a.abs().max().item():.2e} where the gradient is 0"
        else:
            check(name, a, b, None, dt)
