"""m1.fused_moe and m1ops.moe_route against the float64 references (DESIGN 3.2).

Shapes: T tokens, D model dim, F expert FFN dim, E experts, k experts per token.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import DEVICES, assert_rel_close, rel_err, with_

import m1ops
from m1ops.reference import fused_moe_loop_ref, fused_moe_ref, moe_route_ref

# Relative-error budgets against the float64 reference. The kernels compute in
# fp32 (float64 for float64 inputs) from the given inputs, so:
# - fp32: products of length D or F in fp32 lose ~sqrt(len) * 2^-24 ~ 1e-6;
#   DESIGN's 1e-5 leaves a factor of ~10. Gradients go through two more
#   products (e.g. dW = sum over rows of dy^T a), same order. (CUDA: exact
#   fp32 SIMT GEMMs, no TF32.)
# - bf16 / fp16 on the CPU: every output is rounded once to the dtype
#   (relative 2^-9 / 2^-12 per element, ~0.6x that in norm), and for gradients
#   the saved pre-activations are stored in the dtype too (one more rounding of
#   h feeding silu and the product). 4x the per-element rounding covers both.
# - bf16 / fp16 on CUDA: the intermediates that feed the next tensor-core GEMM
#   (silu(g) u, w a, dh) are rounded to the dtype as well, as in any bf16 MLP:
#   up to three roundings in a chain, hence DESIGN's 1e-2 (bf16) and 2e-3 (fp16).
# - float64: the same computation in double, error ~1e-15; 1e-12 leaves room.
TOL = {torch.float32: 1e-5, torch.bfloat16: 4 * 2.0**-9, torch.float16: 4 * 2.0**-12, torch.float64: 1e-12}
CUDA_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Elementwise check on top of the norm (an unwritten element could hide in the
# norm of a large tensor): |out - ref| <= ATOL_SCALE * tol * max|ref|.
ATOL_SCALE = 8.0


def tol_for(dtype, device):
    return CUDA_TOL[dtype] if device == "cuda" else TOL[dtype]


def cuda_rejects(D, F, dtype, device):
    """The CUDA tensor-core GEMMs need 16-byte rows: bf16/fp16 D and F multiples of 8."""
    return device == "cuda" and dtype in (torch.bfloat16, torch.float16) and (D % 8 or F % 8)


def skip_unsupported(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only dtype (for gradcheck); CUDA kernels take fp32/bf16/fp16")


def make_moe(T, D, F, E, k, dtype, device, ids=None, int32_ids=False):
    """Inputs at unit scale: x ~ N(0, 1), weights ~ N(0, 1/fan_in), softmax routing."""
    x = torch.randn(T, D, device=device).to(dtype)
    w_gate_up = (torch.randn(E, 2 * F, D, device=device) / D**0.5).to(dtype)
    w_down = (torch.randn(E, D, F, device=device) / F**0.5).to(dtype)
    topk_weights, topk_ids = m1ops.moe_route(torch.randn(T, E, device=device), k)
    if ids is not None:
        topk_ids = ids.to(device)
    if dtype == torch.float64:
        topk_weights = topk_weights.double()
    if int32_ids:
        topk_ids = topk_ids.int()
    return x, w_gate_up, w_down, topk_weights, topk_ids


def max_abs_err(out, ref):
    return (out.double().cpu() - ref.double().cpu()).abs().max().item() if ref.numel() else 0.0


def assert_close_to_ref(out, ref, tol, what, peer=None):
    """out against the float64 ref: relative error <= tol and max abs error <= ATOL_SCALE tol max|ref|.

    peer: the same computation by PyTorch in out's dtype. DESIGN 4's second rule: no worse than 2x
    its error. This matters where the relative norm is of a few cancelling sums, e.g. d topk_weights
    for one token: a dot product over F whose factors the CUDA path rounds to bf16 (h is saved in the
    dtype) can have any relative error once the sum is near zero.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    rel_tol = tol if peer is None else max(tol, 2 * rel_err(peer, ref))
    assert_rel_close(out, ref, rel_tol, what)
    if ref.numel():
        bound = ATOL_SCALE * tol * ref.abs().max().item()
        if peer is not None:
            bound = max(bound, 2 * max_abs_err(peer, ref))
        worst = max_abs_err(out, ref)
        assert worst <= bound, f"{what}: max abs error {worst:.3e} > {bound:.3e}"


def check_forward_backward(x, w_gate_up, w_down, topk_weights, topk_ids, tol):
    """y and all four gradients against autograd through the float64 reference."""
    inputs = [t.detach().clone().requires_grad_() for t in (x, w_gate_up, w_down, topk_weights)]
    y = m1ops.fused_moe(*inputs, topk_ids)
    assert y.dtype == x.dtype and y.device == x.device and y.shape == x.shape
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y) if y.numel() else [torch.zeros_like(t) for t in inputs]

    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (x, w_gate_up, w_down, topk_weights)]
    y_ref = fused_moe_ref(*ref_inputs, topk_ids.cpu())
    ref_grads = (
        torch.autograd.grad(y_ref, ref_inputs, grad_y.double().cpu(), allow_unused=True)
        if y_ref.numel()
        else [None] * 4
    )
    peers = [None] * 5
    if x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and y_ref.numel():
        peer_inputs = [t.detach().requires_grad_() for t in (x, w_gate_up, w_down, topk_weights)]
        y_peer = fused_moe_ref(*peer_inputs, topk_ids, dtype=x.dtype)
        peers = [y_peer, *torch.autograd.grad(y_peer, peer_inputs, grad_y, allow_unused=True)]
    assert_close_to_ref(y, y_ref, tol, "y", peers[0])
    for name, g, r, t, peer in zip(("x", "w_gate_up", "w_down", "topk_weights"), grads, ref_grads, inputs, peers[1:]):
        assert g.dtype == t.dtype and g.shape == t.shape, f"grad {name}: {g.dtype} {tuple(g.shape)}"
        ref = r if r is not None else torch.zeros_like(t, dtype=torch.float64)
        assert_close_to_ref(g, ref, tol, f"grad {name}", peer if r is not None else None)
    return y, grads


# The grid: T in {0, 1, 7, 1000}, E in {1, 8, 32}, k in {1, 2, 4} (k <= E).
GRID = [(E, k) for E in (1, 8, 32) for k in (1, 2, 4) if k <= E]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("E,k", GRID, ids=[f"E={E},k={k}" for E, k in GRID])
@pytest.mark.parametrize("T", [0, 1, 7, 1000], ids=lambda t: f"T={t}")
def test_matches_reference(T, E, k, dtype, device):
    D, F = 48, 40
    check_forward_backward(*make_moe(T, D, F, E, k, dtype, device), tol_for(dtype, device))


# Dims that are not multiples of the kernels' chunks and tiles (CPU: 128
# columns, 256 rows; CUDA: 128 x 128 tiles), experts with more rows than a
# row block, and tiny dims. CUDA bf16/fp16 need D, F multiples of 8: the
# unaligned shapes must raise a clear error there.
SHAPES = {  # (T, D, F, E, k)
    "D=200,F=150,E=4": (700, 200, 150, 4, 2),
    "D=1,F=1": (9, 1, 1, 3, 2),
    "D=130,F=257,E=2,k=2": (200, 130, 257, 2, 2),
    "D=136,F=264,E=3": (333, 136, 264, 3, 2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_awkward_shapes(shape, dtype, device):
    skip_unsupported(device, dtype)
    T, D, F, E, k = shape
    inputs = make_moe(*shape, dtype, device)
    if cuda_rejects(D, F, dtype, device):
        with pytest.raises(ValueError, match="multiples of 8"):
            m1ops.fused_moe(*inputs)
        return
    check_forward_backward(*inputs, tol_for(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_tokens_to_one_expert(dtype, device):
    """Every token picks expert 5 (and k=2 with a second, also fixed, choice):
    one expert gets 600 rows, the others none — their gradients must be 0."""
    T, D, F, E = 600, 64, 160, 8
    ids = torch.tensor([[5, 2]]).expand(T, 2).contiguous()
    x, wgu, wd, tw, ids = make_moe(T, D, F, E, 2, dtype, device, ids=ids)
    _, grads = check_forward_backward(x, wgu, wd, tw, ids, tol_for(dtype, device))
    idle = [e for e in range(E) if e not in (2, 5)]
    assert (grads[1][idle] == 0).all() and (grads[2][idle] == 0).all(), "experts without tokens get zero gradients"
    assert (grads[1][[2, 5]] != 0).any() and (grads[2][[2, 5]] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
def test_experts_without_tokens(device):
    """Only even experts are chosen; odd experts' weight gradients are exactly 0."""
    T, D, F, E, k = 100, 32, 24, 8, 2
    ids = torch.stack([torch.randperm(E // 2)[:k] * 2 for _ in range(T)])
    x, wgu, wd, tw, ids = make_moe(T, D, F, E, k, torch.float32, device, ids=ids)
    _, grads = check_forward_backward(x, wgu, wd, tw, ids, TOL[torch.float32])
    assert (grads[1][1::2] == 0).all() and (grads[2][1::2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_duplicate_ids_in_a_row(device):
    """Routing never repeats an expert in a row, but the op's math allows it:
    both choices go through the same expert and add up."""
    T, D, F, E = 20, 16, 12, 4
    ids = torch.randint(0, E, (T, 1)).expand(T, 3).contiguous()
    x, wgu, wd, tw, ids = make_moe(T, D, F, E, 3, torch.float32, device, ids=ids)
    check_forward_backward(x, wgu, wd, tw, ids, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_int32_ids_strided_x_and_determinism(device):
    """int32 ids equal int64 ids bit for bit; a row-strided x equals its
    contiguous copy; two runs agree bit for bit (stable permutation)."""
    T, D, F, E, k = 333, 40, 36, 8, 2
    x, wgu, wd, tw, ids = make_moe(T, D, F, E, k, torch.float32, device)
    y = m1ops.fused_moe(x, wgu, wd, tw, ids)
    torch.testing.assert_close(m1ops.fused_moe(x, wgu, wd, tw, ids.int()), y, rtol=0, atol=0)
    torch.testing.assert_close(m1ops.fused_moe(x, wgu, wd, tw, ids), y, rtol=0, atol=0)
    wide = torch.randn(T, 2 * D, device=device)
    wide[:, 5 : 5 + D] = x
    xs = wide[:, 5 : 5 + D]
    assert not xs.is_contiguous()
    torch.testing.assert_close(m1ops.fused_moe(xs, wgu, wd, tw, ids), y, rtol=0, atol=0)
    g = torch.randn_like(y)
    first = m1ops.fused_moe_backward(g, x, wgu, wd, tw, ids)
    second = m1ops.fused_moe_backward(g, xs, wgu, wd, tw, ids.int())
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_and_recomputed_pre_activations_agree(dtype, device):
    """The backward with the forward's saved gate_up equals the one that
    recomputes it (fp32: up to GEMM rounding; bf16: the saved copy is rounded)."""
    T, D, F, E, k = 150, 64, 48, 8, 2
    x, wgu, wd, tw, ids = make_moe(T, D, F, E, k, dtype, device)
    y, gate_up = torch.ops.m1.fused_moe(x, wgu, wd, tw, ids, save_gate_up=True)
    assert gate_up.shape == (T * k, 2 * F) and gate_up.dtype == dtype
    y_plain, empty = torch.ops.m1.fused_moe(x, wgu, wd, tw, ids)
    assert empty.shape == (0, 2 * F)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    g = torch.randn_like(y)
    saved = m1ops.fused_moe_backward(g, x, wgu, wd, tw, ids, gate_up)
    recomputed = m1ops.fused_moe_backward(g, x, wgu, wd, tw, ids, None)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "topk_weights"), saved, recomputed):
        assert_rel_close(a, b, 1e-6 if dtype == torch.float32 else tol_for(dtype, device), f"grad {name}")


def test_references_agree():
    """The dense form and the token loop are independent derivations of the same
    math; they agree on the output and on every gradient."""
    T, D, F, E, k = 23, 12, 10, 5, 3
    x, wgu, wd, tw, ids = make_moe(T, D, F, E, k, torch.float64, "cpu")
    inputs = [t.requires_grad_() for t in (x, wgu, wd, tw)]
    y1, y2 = fused_moe_ref(*inputs, ids), fused_moe_loop_ref(*inputs, ids)
    assert_rel_close(y1, y2, 1e-13, "y")
    g = torch.randn_like(y1)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "topk_weights"), torch.autograd.grad(y1, inputs, g),
                          torch.autograd.grad(y2, inputs, g)):
        assert_rel_close(a, b, 1e-13, f"grad {name}")
    # One hand-computed token: expert 0 only, k = 1, weight 1.
    xt, wgu0, wd0 = x[:1], wgu[:1], wd[:1]
    h = wgu0[0] @ xt[0]
    expected = wd0[0] @ (h[:F] * torch.sigmoid(h[:F]) * h[F:])
    one = torch.ones(1, 1, dtype=torch.float64)
    assert_rel_close(fused_moe_ref(xt, wgu0, wd0, one, torch.zeros(1, 1, dtype=torch.long))[0], expected, 1e-14, "one token")


def test_gradcheck_float64():
    T, D, F, E, k = 6, 5, 4, 3, 2
    x, wgu, wd, tw, ids = make_moe(T, D, F, E, k, torch.float64, "cpu")
    inputs = [t.requires_grad_() for t in (x, wgu, wd, tw)]
    assert torch.autograd.gradcheck(lambda *a: m1ops.fused_moe(*a, ids), inputs)


# ---------------------------------------------------------------- routing


def test_route_matches_reference_and_ties_go_to_the_lower_index():
    T, E, k = 64, 8, 3
    logits = torch.randn(T, E)
    # Exact ties: rows of equal logits, pairs of equal logits, ties at the cut.
    logits[0] = 0.0
    logits[1] = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, -1.0, 2.0, 2.0])
    logits[2] = torch.tensor([5.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 2.0])
    logits[3:10] = logits[3:10].round()  # many ties
    w, ids = m1ops.moe_route(logits, k)
    w_ref, ids_ref = moe_route_ref(logits, k)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and w.shape == (T, k)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    assert_rel_close(w, w_ref, 1e-6, "topk_weights")
    assert ids[0].tolist() == [0, 1, 2]
    assert ids[1].tolist() == [1, 2, 4]
    assert ids[2].tolist() == [0, 2, 3]
    torch.testing.assert_close(w.sum(-1), torch.ones(T), rtol=1e-6, atol=1e-6)


def test_route_reads_any_float_dtype_in_fp32():
    logits = torch.randn(10, 8)
    w16, ids16 = m1ops.moe_route(logits.bfloat16(), 2)
    w32, ids32 = m1ops.moe_route(logits.bfloat16().float(), 2)
    torch.testing.assert_close(ids16, ids32, rtol=0, atol=0)
    torch.testing.assert_close(w16, w32, rtol=0, atol=0)
    with pytest.raises(ValueError, match=re.escape("top_k must be in [1, E] = [1, 8]")):
        m1ops.moe_route(logits, 9)
    with pytest.raises(ValueError, match="must be 2-D"):
        m1ops.moe_route(logits[0], 2)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_through_routing(device):
    """router logits -> moe_route -> fused_moe: d logits (through the
    renormalised softmax) and dx against the float64 chain."""
    T, D, F, E, k = 40, 24, 20, 8, 2
    x = torch.randn(T, D, device=device, requires_grad=True)
    router = torch.randn(E, D, device=device) / D**0.5
    wgu = (torch.randn(E, 2 * F, D, device=device) / D**0.5).requires_grad_()
    wd = (torch.randn(E, D, F, device=device) / F**0.5).requires_grad_()
    grad_y = torch.randn(T, D, device=device)

    logits = x @ router.T
    tw, ids = m1ops.moe_route(logits, k)
    y = m1ops.fused_moe(x, wgu, wd, tw, ids)
    gx, gwgu, gwd = torch.autograd.grad(y, (x, wgu, wd), grad_y)

    x64, wgu64, wd64 = (t.detach().double().cpu().requires_grad_() for t in (x, wgu, wd))
    tw64, ids64 = moe_route_ref(x64 @ router.double().cpu().T, k)
    assert torch.equal(ids.cpu(), ids64)
    y64 = fused_moe_ref(x64, wgu64, wd64, tw64, ids64)
    rx, rwgu, rwd = torch.autograd.grad(y64, (x64, wgu64, wd64), grad_y.double().cpu())
    assert_rel_close(y, y64, 1e-5, "y")
    assert_rel_close(gx, rx, 1e-5, "grad x (through the router)")
    assert_rel_close(gwgu, rwgu, 1e-5, "grad w_gate_up")
    assert_rel_close(gwd, rwd, 1e-5, "grad w_down")


# ---------------------------------------------------------------- bad inputs


def _bad_cases():
    """(id, mutate(args) -> args, exception type, message fragment)."""

    def set_id(value, at=(3, 1), dtype=torch.int64):
        def f(a):
            ids = a["topk_ids"].clone().to(dtype)
            ids[at] = value
            return ids

        return f

    return [
        ("id-too-large", with_(topk_ids=set_id(4)), ValueError, "'topk_ids' must hold expert indices in [0, E) = [0, 4), got 4 at [3, 1]"),
        ("id-negative", with_(topk_ids=set_id(-1, (0, 0))), ValueError, "got -1 at [0, 0]"),
        ("id-huge-int64", with_(topk_ids=set_id(2**40, (6, 0))), ValueError, f"got {2**40} at [6, 0]"),
        ("id-int32", with_(topk_ids=set_id(7, (2, 1), torch.int32)), ValueError, "got 7 at [2, 1]"),
        ("ids-float", with_(topk_ids=lambda a: a["topk_ids"].float()), TypeError, "'topk_ids' must be int64 or int32"),
        ("ids-shape", with_(topk_ids=lambda a: a["topk_ids"][:, :1]), ValueError, "'topk_ids' must have shape [T, k]"),
        ("x-3d", with_(x=lambda a: a["x"][None]), ValueError, "'x' must be 2-D [T, D]"),
        ("x-int", with_(x=lambda a: a["x"].int()), TypeError, "'x' must be float32, bfloat16 or float16"),
        ("w_gate_up-odd", with_(w_gate_up=lambda a: a["w_gate_up"][:, :-1]), ValueError, "odd second dimension"),
        ("w_gate_up-D", with_(w_gate_up=lambda a: a["w_gate_up"][..., :-1]), ValueError, "'w_gate_up' must have shape [E, 2F, D]"),
        ("w_gate_up-dtype", with_(w_gate_up=lambda a: a["w_gate_up"].bfloat16()), TypeError, "'w_gate_up' must be Float"),
        ("w_gate_up-empty", with_(w_gate_up=lambda a: a["w_gate_up"][:0], w_down=lambda a: a["w_down"][:0]), ValueError, "at least one expert"),
        ("w_down-E", with_(w_down=lambda a: a["w_down"][:-1]), ValueError, "'w_down' must have shape [E, D, F]"),
        ("w_down-F", with_(w_down=lambda a: a["w_down"][..., :-1]), ValueError, "'w_down' must have shape [E, D, F]"),
        ("weights-T", with_(topk_weights=lambda a: a["topk_weights"][:-1]), ValueError, "'topk_weights' must have shape [T, k]"),
        ("weights-dtype", with_(topk_weights=lambda a: a["topk_weights"].bfloat16()), TypeError, "'topk_weights' must be float32"),
        ("weights-f64-with-f32", with_(topk_weights=lambda a: a["topk_weights"].double()), TypeError, "'topk_weights' must be float32"),
    ]


@pytest.mark.parametrize("name,mutate,exc,fragment", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_inputs_raise_clear_errors(name, mutate, exc, fragment):
    x, wgu, wd, tw, ids = make_moe(8, 16, 12, 4, 2, torch.float32, "cpu")
    args = mutate(dict(x=x, w_gate_up=wgu, w_down=wd, topk_weights=tw, topk_ids=ids))
    with pytest.raises(exc, match=re.escape(fragment)) as info:
        m1ops.fused_moe(**args)
    assert "m1.fused_moe" in str(info.value)  # the error names the op
    # The backward op validates the same way before touching anything.
    grad_y = torch.randn(args["x"].shape[0], 16) if args["x"].dim() == 2 else torch.randn(8, 16)
    with pytest.raises(exc, match=re.escape(fragment)) as info:
        m1ops.fused_moe_backward(grad_y.to(args["x"].dtype) if args["x"].is_floating_point() else grad_y, **args)
    assert "m1.fused_moe_backward" in str(info.value)


def test_backward_checks_its_own_arguments():
    x, wgu, wd, tw, ids = make_moe(8, 16, 12, 4, 2, torch.float32, "cpu")
    g = torch.randn(8, 16)
    with pytest.raises(ValueError, match=re.escape("'grad_y' must have shape [T, D]")):
        m1ops.fused_moe_backward(g[:-1], x, wgu, wd, tw, ids)
    with pytest.raises(TypeError, match="'grad_y' must be Float"):
        m1ops.fused_moe_backward(g.double(), x, wgu, wd, tw, ids)
    with pytest.raises(ValueError, match=re.escape("'gate_up' must have shape [T * k, 2F]")):
        m1ops.fused_moe_backward(g, x, wgu, wd, tw, ids, torch.randn(16, 23))
    with pytest.raises(TypeError, match="'gate_up' must be Float"):
        m1ops.fused_moe_backward(g, x, wgu, wd, tw, ids, torch.randn(16, 24).bfloat16())
    # An expanded gradient (what autograd hands in for y.sum()) is fine.
    expanded = torch.ones(1, 1).expand(8, 16)
    out = m1ops.fused_moe_backward(expanded, x, wgu, wd, tw, ids)
    ref = m1ops.fused_moe_backward(expanded.contiguous(), x, wgu, wd, tw, ids)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bad_ids_and_mixed_devices_raise():
    x, wgu, wd, tw, ids = make_moe(64, 32, 24, 4, 2, torch.bfloat16, "cuda")
    bad = ids.clone()
    bad[10, 1] = 4
    with pytest.raises(ValueError, match=re.escape("'topk_ids' must hold expert indices in [0, E) = [0, 4)")):
        m1ops.fused_moe(x, wgu, wd, tw, bad)
    bad[10, 1] = -3
    with pytest.raises(ValueError, match="outside that range"):
        m1ops.fused_moe_backward(torch.randn_like(x), x, wgu, wd, tw, bad)
    with pytest.raises(RuntimeError, match="all tensors must be on one device"):
        m1ops.fused_moe(x, wgu, wd, tw.cpu(), ids)
    # After the errors the op still works (nothing was left half-done on the device).
    check_forward_backward(x, wgu, wd, tw, ids, CUDA_TOL[torch.bfloat16])


# The CUDA forward's fused gate/up kernel (csrc/moe/moe_gate_up_cuda.cu):
# 64-row x 64-column tiles over the expert-sorted rows, K steps of 32 (bf16 /
# fp16) or 16 (fp32). Shapes with row, column and K tails, experts without
# rows, an expert spanning several M-tiles, and F below one tile. bf16/fp16 x
# read in place needs 16-byte rows; a view at an odd offset takes the unfused
# path (gather, CUTLASS GEMM, elementwise pass): both paths are checked.
FUSED_SHAPES = {  # (T, D, F, E, k, experts used)
    "tails,empty experts": (300, 200, 200, 6, 2, (0, 2, 5)),
    "one tile": (64, 32, 64, 1, 1, (0,)),
    "F<BN,D=8": (37, 8, 8, 4, 3, (1, 2, 3)),
    "multi M-tiles": (700, 72, 136, 8, 1, (6,)),
}


def odd_offset(x):
    """x's values in a view whose rows start one element past a 16-byte boundary."""
    wide = torch.zeros(x.shape[0], x.shape[1] + 1, device=x.device, dtype=x.dtype)
    wide[:, 1:] = x
    return wide[:, 1:]


def sorted_pre_activations_ref(x, w_gate_up, ids):
    """h = [g | u] in float64 for every slot, rows in expert-sorted order (stable by slot)."""
    flat = ids.flatten().cpu()
    slots = torch.sort(flat, stable=True).indices
    xs = x.double().cpu()[slots // ids.shape[1]]  # [P, D]
    experts = flat[slots]  # [P], ascending
    h = torch.empty(len(slots), w_gate_up.shape[1], dtype=torch.float64)
    for e in experts.unique().tolist():
        rows = experts == e
        h[rows] = xs[rows] @ w_gate_up[e].double().cpu().T
    return h


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", FUSED_SHAPES.values(), ids=FUSED_SHAPES.keys())
def test_cuda_fused_gate_up(shape, dtype, monkeypatch):
    """y, every gradient and the saved pre-activations of the fused gate/up
    kernel against float64, and against the unfused path (x at an odd offset)."""
    monkeypatch.setenv("M1_MOE_GATE_UP", "fused")  # the default takes the unfused path on sm_90
    T, D, F, E, k, used = shape
    pick = torch.tensor(used)
    ids = torch.stack([pick[torch.randperm(len(used))[:k]] for _ in range(T)])  # k distinct used experts
    x, wgu, wd, tw, ids = make_moe(T, D, F, E, k, dtype, "cuda", ids=ids)
    tol = CUDA_TOL[dtype]
    h_ref = sorted_pre_activations_ref(x, wgu, ids)
    _, grads = check_forward_backward(x, wgu, wd, tw, ids, tol)  # the fused forward (x contiguous)
    unused = [e for e in range(E) if e not in used]
    assert (grads[1][unused] == 0).all() and (grads[2][unused] == 0).all()

    y, gate_up = torch.ops.m1.fused_moe(x, wgu, wd, tw, ids, save_gate_up=True)
    assert_close_to_ref(gate_up, h_ref, tol, "gate_up")
    y_plain, _ = torch.ops.m1.fused_moe(x, wgu, wd, tw, ids)
    torch.testing.assert_close(y_plain, y, rtol=0, atol=0)

    # x at an odd element offset: bf16/fp16 take the unfused path, fp32 the fused one (scalar loads).
    x_odd = odd_offset(x)
    y_odd, gate_up_odd = torch.ops.m1.fused_moe(x_odd, wgu, wd, tw, ids, save_gate_up=True)
    y_ref = fused_moe_ref(x.double().cpu(), wgu.double().cpu(), wd.double().cpu(), tw.double().cpu(), ids.cpu())
    assert_close_to_ref(y_odd, y_ref, tol, "y (x at an odd offset)")
    assert_close_to_ref(gate_up_odd, h_ref, tol, "gate_up (x at an odd offset)")
    if dtype == torch.float32:
        torch.testing.assert_close(y_odd, y, rtol=0, atol=0)
    else:
        # Both round h / act to the dtype once, from different fp32 sums: within a few ulps.
        assert_rel_close(y_odd, y, tol, "fused vs unfused y")
    # The backward from either path's saved pre-activations.
    g = torch.randn_like(y)
    from_fused = m1ops.fused_moe_backward(g, x, wgu, wd, tw, ids, gate_up)
    from_unfused = m1ops.fused_moe_backward(g, x_odd, wgu, wd, tw, ids, gate_up_odd)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "topk_weights"), from_fused, from_unfused):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), f"grad {name}: non-finite values"
        assert_rel_close(b, a, tol, f"grad {name}: unfused vs fused pre-activations")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_gate_up_switch(dtype, monkeypatch):
    """M1_MOE_GATE_UP picks forward step 3: 'unfused' on aligned x is the path an odd-offset x takes,
    'auto' (the default) is unfused for bf16/fp16 on sm_90+ and fused otherwise; bad values raise."""
    x, wgu, wd, tw, ids = make_moe(300, 64, 48, 5, 2, dtype, "cuda")
    tol = CUDA_TOL[dtype]
    out = {}
    for mode in ("fused", "unfused", "auto", None):
        if mode is None:
            monkeypatch.delenv("M1_MOE_GATE_UP")
        else:
            monkeypatch.setenv("M1_MOE_GATE_UP", mode)
        out[mode] = torch.ops.m1.fused_moe(x, wgu, wd, tw, ids, save_gate_up=True)
    y_ref = fused_moe_ref(x.double().cpu(), wgu.double().cpu(), wd.double().cpu(), tw.double().cpu(), ids.cpu())
    h_ref = sorted_pre_activations_ref(x, wgu, ids)
    for mode in ("fused", "unfused"):
        assert_close_to_ref(out[mode][0], y_ref, tol, f"y ({mode})")
        assert_close_to_ref(out[mode][1], h_ref, tol, f"gate_up ({mode})")
    y_odd, _ = torch.ops.m1.fused_moe(odd_offset(x), wgu, wd, tw, ids)
    if dtype != torch.float32:  # fp32 takes the fused kernel at any offset (scalar loads)
        torch.testing.assert_close(y_odd, out["unfused"][0], rtol=0, atol=0)
        # The two paths round differently, so the comparisons below can tell which one ran.
        assert not torch.equal(out["fused"][0], out["unfused"][0])
    sm90 = torch.cuda.get_device_capability(x.device)[0] >= 9
    expect = "unfused" if dtype != torch.float32 and sm90 else "fused"
    for mode in ("auto", None):
        torch.testing.assert_close(out[mode][0], out[expect][0], rtol=0, atol=0)
        torch.testing.assert_close(out[mode][1], out[expect][1], rtol=0, atol=0)
    monkeypatch.setenv("M1_MOE_GATE_UP", "fast")
    with pytest.raises(ValueError, match="M1_MOE_GATE_UP must be 'auto', 'fused' or 'unfused', got 'fast'"):
        torch.ops.m1.fused_moe(x, wgu, wd, tw, ids)


# ---------------------------------------------------------------- torch integration


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype, device):
    skip_unsupported(device, dtype)
    for T, D, F, E, k in [(7, 16, 24, 4, 2), (1, 8, 8, 1, 1), (0, 8, 16, 3, 2)]:
        x, wgu, wd, tw, ids = make_moe(T, D, F, E, k, dtype, device)
        for t in (x, wgu, wd, tw):
            t.requires_grad_()
        for save in (False, True):
            torch.library.opcheck(torch.ops.m1.fused_moe.default, (x, wgu, wd, tw, ids), {"save_gate_up": save})
        _, gate_up = torch.ops.m1.fused_moe(x, wgu, wd, tw, ids, save_gate_up=True)
        g = torch.randn(T, D, device=device, dtype=dtype)
        args = [t.detach() for t in (g, x, wgu, wd, tw)] + [ids]
        torch.library.opcheck(torch.ops.m1.fused_moe_backward.default, (*args, gate_up.detach()))
        torch.library.opcheck(torch.ops.m1.fused_moe_backward.default, (*args, None))


def test_fake_impl_shapes():
    x, wgu, wd, tw, ids = (t.to("meta") for t in make_moe(5, 16, 12, 4, 3, torch.bfloat16, "cpu"))
    y, gate_up = torch.ops.m1.fused_moe(x, wgu, wd, tw, ids, save_gate_up=True)
    assert y.shape == (5, 16) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    assert gate_up.shape == (15, 24) and gate_up.dtype == torch.bfloat16
    grads = torch.ops.m1.fused_moe_backward(y, x, wgu, wd, tw, ids, gate_up)
    assert [g.shape for g in grads] == [x.shape, wgu.shape, wd.shape, tw.shape]
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3 + [torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """A MoE block (router, routing, fused experts, residual) and its backward compile as one graph."""
    T, D, F, E, k = 24, 32, 16, 8, 2
    x = torch.randn(T, D, device=device)
    router = torch.randn(E, D, device=device) / D**0.5
    wgu = (torch.randn(E, 2 * F, D, device=device) / D**0.5).requires_grad_()
    wd = (torch.randn(E, D, F, device=device) / F**0.5).requires_grad_()

    def block(x, router, wgu, wd):
        tw, ids = m1ops.moe_route(x @ router.T, k)
        return x + m1ops.fused_moe(torch.nn.functional.rms_norm(x, (D,)), wgu, wd, tw, ids)

    def run(fn):
        xr = x.clone().requires_grad_()
        y = fn(xr, router, wgu, wd)
        grads = torch.autograd.grad(y.square().sum(), (xr, wgu, wd))
        return y, grads

    y_eager, g_eager = run(block)
    torch._dynamo.reset()
    y_comp, g_comp = run(torch.compile(block, fullgraph=True))
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
