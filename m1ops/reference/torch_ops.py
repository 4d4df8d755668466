"""The m1 ops in plain PyTorch, with exactly the m1ops signatures (DESIGN 3), written from the math.

These are the slow, readable twins of the kernels: m1model's reference path
(`m1model.ops.use_reference(True)`) runs them in place of the m1ops kernels,
with the same arguments and output dtypes. The float64 test references in
this package (`lightning_attn_ref`, `fused_moe_ref`, ...) are independent
formulations used to check both.

Compute is fp32 (fp64 when the inputs are fp64); outputs take the dtype the
m1ops contract names. Everything is differentiable through plain autograd.

Shapes: B batch, T tokens, H heads, K key dim, V value dim, N sequences,
D model dim, E experts, F expert FFN dim, k experts per token, W vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ------------------------------------------------------------------ lightning attention (3.1)


def _lightning_blocks(q, k, v, slope, state, scale: float, block: int):
    """Blockwise lightning attention over equal-length sequences (Lightning Attention-2).

    q, k: [B, T, H, K]; v: [B, T, H, V]; slope: [H]; state: [B, H, K, V] (compute dtype).
    Returns o [B, T, H, V] and the state after the last token, both in the compute dtype.

    Inside a block of m tokens (i, j = 0..m-1, lambda = exp(-s)):
        o_i = lambda^(i+1) q_i S + sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j
        S  <- lambda^m S + sum_j lambda^(m-1-j) k_j^T v_j
    """
    dt = state.dtype
    q, k, v = (x.to(dt).transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    s = slope.to(dt)[:, None, None]  # [H, 1, 1]
    T = q.shape[2]
    outs = []
    for start in range(0, T, block):
        qb, kb, vb = q[:, :, start : start + block], k[:, :, start : start + block], v[:, :, start : start + block]
        m = qb.shape[2]
        i = torch.arange(m, device=q.device, dtype=dt)
        dist = i[:, None] - i[None, :]  # i - j
        decay = torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), torch.zeros((), dtype=dt, device=q.device))
        q_decay = torch.exp(-s * (i[:, None] + 1))  # [H, m, 1]
        k_decay = torch.exp(-s * (m - 1 - i[:, None]))  # [H, m, 1]
        intra = ((qb @ kb.transpose(-1, -2)) * decay) @ vb
        inter = (qb * q_decay) @ state
        outs.append(intra + inter)
        state = torch.exp(-s * m) * state + (kb * k_decay).transpose(-1, -2) @ vb
    o = torch.cat(outs, dim=2) if outs else q.new_zeros(q.shape[0], q.shape[1], 0, v.shape[-1])
    return (scale * o).transpose(1, 2), state


def lightning_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32 (or None); see m1ops.lightning_attn."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, T, H) or slope.shape != (H,):
        raise ValueError(
            f"lightning_attn: expected q, k [B, T, H, K], v [B, T, H, V], slope [H]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}, slope {tuple(slope.shape)}"
        )
    block = block_size or 256
    dt = _compute_dtype(q, k, v)
    if cu_seqlens is None:
        bounds = None
        N = B
    else:
        if B != 1:
            raise ValueError(f"lightning_attn: cu_seqlens needs B == 1, got B = {B}")
        cu = [int(x) for x in cu_seqlens.tolist()]
        if not cu or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"lightning_attn: cu_seqlens must rise from 0 to T = {T}, got {cu}")
        bounds = list(zip(cu[:-1], cu[1:]))
        N = len(bounds)
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(f"lightning_attn: initial_state must be [{N}, {H}, {K}, {V}], got {tuple(initial_state.shape)}")
    s0 = initial_state.to(dt) if initial_state is not None else q.new_zeros(N, H, K, V, dtype=dt)
    if bounds is None:
        o, final = _lightning_blocks(q, k, v, slope, s0, scale, block)
    else:
        outs, finals = [], []
        for n, (a, b) in enumerate(bounds):
            o_n, f_n = _lightning_blocks(q[:, a:b], k[:, a:b], v[:, a:b], slope, s0[n : n + 1], scale, block)
            outs.append(o_n)
            finals.append(f_n)
        o = torch.cat(outs, dim=1) if outs else q.new_zeros(1, 0, H, V, dtype=dt)
        final = torch.cat(finals) if finals else s0
    state_dtype = torch.float64 if dt == torch.float64 else torch.float32
    return o.to(v.dtype), (final.to(state_dtype) if output_final_state else None)


def lightning_attn_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, state: torch.Tensor, *, scale: float = 1.0
) -> torch.Tensor:
    """One token per sequence: state <- exp(-s) state + k^T v (in place); o = scale q state. o [B, H, V]."""
    dt = state.dtype
    lam = torch.exp(-slope.to(dt))[None, :, None, None]
    state.mul_(lam).add_(k.to(dt)[..., :, None] * v.to(dt)[..., None, :])
    return (scale * (q.to(dt)[..., None, :] @ state)[..., 0, :]).to(v.dtype)


# ------------------------------------------------------------------------------ MoE (3.2)


def moe_route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax in fp32, top-k with ties to the lower index, renormalised. ([T, k] fp32, [T, k] int64)."""
    p = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    ids = torch.sort(p, dim=-1, descending=True, stable=True).indices[:, :top_k]  # stable: ties keep index order
    w = p.gather(-1, ids)
    return w / w.sum(dim=-1, keepdim=True), ids


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """y_t = sum_j w_tj W_down[e] (silu(W_gate[e] x_t) * W_up[e] x_t), e = topk_ids[t, j]. y [T, D] in x's dtype."""
    T, D = x.shape
    E, F2, D2 = w_gate_up.shape
    Fdim = F2 // 2
    if D2 != D or F2 % 2 or w_down.shape != (E, D, Fdim) or topk_ids.shape != topk_weights.shape:
        raise ValueError(
            f"fused_moe: expected x [T, D], w_gate_up [E, 2F, D], w_down [E, D, F], topk [T, k]; got x {tuple(x.shape)}, "
            f"w_gate_up {tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)}, topk_weights "
            f"{tuple(topk_weights.shape)}, topk_ids {tuple(topk_ids.shape)}"
        )
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= E):
        raise ValueError(
            f"fused_moe: topk_ids must lie in [0, {E}), got values in [{int(topk_ids.min())}, {int(topk_ids.max())}]"
        )
    dt = _compute_dtype(x, w_gate_up)
    k = topk_ids.shape[1]
    # Group the (token, slot) pairs by expert: a stable sort of the flat ids is the permutation,
    # the histogram gives each expert's contiguous range.
    flat = topk_ids.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    xs = x.to(dt)[order // k]  # [T*k, D] token rows in expert order
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            h = xs[start : start + n] @ w_gate_up[e].to(dt).t()  # [n, 2F]: gate columns first, then up
            outs.append((F.silu(h[:, :Fdim]) * h[:, Fdim:]) @ w_down[e].to(dt).t())  # [n, D]
        start += n
    out = torch.cat(outs) if outs else xs.new_zeros(0, D)
    out = out[torch.argsort(order)].view(T, k, D)  # back to (token, slot) order
    y = (out * topk_weights.to(dt)[..., None]).sum(dim=1)
    return y.to(x.dtype)


# -------------------------------------------------------------------------- FP32 head (3.3)


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [N, D] @ weight [W, D]^T in fp32 (fp64 for fp64 inputs): [N, W]."""
    dt = _compute_dtype(hidden, weight)
    return hidden.to(dt) @ weight.to(dt).t()


def fp32_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
):
    """log softmax(hidden W^T / temperature)[n, targets[n]]: [N] fp32; ignored targets give 0 (and entropy 0)."""
    W = weight.shape[0]
    keep = targets != ignore_index
    bad = keep & ((targets < 0) | (targets >= W))
    if bool(bad.any()):
        raise ValueError(f"fp32_logprobs: targets must lie in [0, {W}) or equal ignore_index={ignore_index}")
    z = fp32_logits(hidden, weight) / temperature  # [N, W]
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(-1, torch.where(keep, targets, 0)[:, None])[:, 0]
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    logprobs = torch.where(keep, picked - lse, zero)
    if not return_entropy:
        return logprobs
    entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logprobs, torch.where(keep, entropy, zero)


# ----------------------------------------------------------------------------- RMSNorm (5)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """m1ops.rms_norm: x / sqrt(mean(x^2) + eps) in fp32 (fp64 for float64 x), rounded to x's dtype,
    times the weight (transformers' MiniMaxRMSNorm; the result takes torch's type promotion)."""
    xf = x.to(_compute_dtype(x))
    y = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * y
