"""Lightning attention references (DESIGN 3.1), written from the math.

Shapes: B batch, T tokens, H heads, K key dim, V value dim, N sequences.
Token-major layout: q, k [B, T, H, K]; v [B, T, H, V]; states [N, H, K, V].

For one sequence and head h, with lambda = exp(-slope_h) and S_0 the initial state:

    S_t = lambda * S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t
        = scale * (lambda^t q_t S_0 + sum_{j<=t} lambda^(t-j) (q_t . k_j) v_j)      (t = 1..T)

Two independent forms are given: the closed form (`lightning_attn_ref`, one
matrix per sequence, quadratic in T) and the recurrence
(`lightning_attn_recurrent_ref`, a loop over tokens). Both compute in float64
unless told otherwise and return o in float64 and the final state in float64.
"""

from __future__ import annotations

import torch


def _segments(T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(cu[:-1], cu[1:]))


def _sequences(q, cu_seqlens):
    """(batch index, start, end) of every independent sequence, in state order."""
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    return [(0, s, e) for s, e in _segments(T, cu_seqlens)]


def lightning_attn_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed form: o = scale * ((Q K^T) * D) V + scale * (lambda^t Q) S_0.

    D[t, j] = lambda^(t - j) for j <= t (zero above the diagonal). Returns
    (o [B, T, H, V], final_state [N, H, K, V]) in `dtype`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    s = slope.to(dtype)
    seqs = _sequences(q, cu_seqlens)
    s0 = (
        initial_state.to(dtype)
        if initial_state is not None
        else torch.zeros(len(seqs), H, K, V, dtype=dtype, device=q.device)
    )
    o = torch.zeros(B, T, H, V, dtype=dtype, device=q.device)
    final = torch.empty(len(seqs), H, K, V, dtype=dtype, device=q.device)
    for n, (b, start, end) in enumerate(seqs):
        L = end - start
        t = torch.arange(1, L + 1, dtype=dtype, device=q.device)  # 1-based token index
        qs, ks, vs = (x[b, start:end].transpose(0, 1) for x in (q, k, v))  # [H, L, *]
        dist = t[:, None] - t[None, :]  # t - j
        decay = torch.exp(-s[:, None, None] * dist.clamp(min=0)) * (dist >= 0)  # [H, L, L]
        scores = (qs @ ks.transpose(1, 2)) * decay
        from_state = torch.exp(-s[:, None, None] * t[None, :, None]) * (qs @ s0[n])  # lambda^t q_t S_0
        o[b, start:end] = (scale * (scores @ vs + from_state)).transpose(0, 1)
        # S_L = lambda^L S_0 + sum_j lambda^(L - j) k_j^T v_j
        w = torch.exp(-s[:, None] * (L - t)[None, :])  # [H, L]
        final[n] = torch.exp(-s * L)[:, None, None] * s0[n] + (ks * w[..., None]).transpose(1, 2) @ vs
    return o, final


def lightning_attn_recurrent_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one token at a time. Same interface as lightning_attn_ref."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (x.to(dtype) for x in (q, k, v))
    lam = torch.exp(-slope.to(dtype))[:, None, None]  # [H, 1, 1]
    seqs = _sequences(q, cu_seqlens)
    o = torch.zeros(B, T, H, V, dtype=dtype, device=q.device)
    final = torch.empty(len(seqs), H, K, V, dtype=dtype, device=q.device)
    for n, (b, start, end) in enumerate(seqs):
        S = (
            initial_state[n].to(dtype).clone()
            if initial_state is not None
            else torch.zeros(H, K, V, dtype=dtype, device=q.device)
        )
        for t in range(start, end):
            S = lam * S + k[b, t][:, :, None] * v[b, t][:, None, :]  # k_t^T v_t per head
            o[b, t] = scale * (q[b, t][:, None, :] @ S)[:, 0]
        final[n] = S
    return o, final


def lightning_attn_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slope: torch.Tensor,
    state: torch.Tensor,
    *,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step, functional: returns (o [B, H, V], new_state [B, H, K, V]) in `dtype`.

    q, k: [B, H, K]; v: [B, H, V]; state: [B, H, K, V]. Does not modify `state`.
    """
    q, k, v, state = (x.to(dtype) for x in (q, k, v, state))
    lam = torch.exp(-slope.to(dtype))[None, :, None, None]
    new_state = lam * state + k[..., :, None] * v[..., None, :]
    o = scale * (q[..., None, :] @ new_state)[..., 0, :]
    return o, new_state
