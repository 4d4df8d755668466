"""Fused MoE references (DESIGN 3.2), written from the math.

Shapes: T tokens, D model dim, F expert FFN dim, E experts, k experts per token.
w_gate_up [E, 2F, D] holds the gate rows then the up rows; w_down [E, D, F].

    p       = softmax(router_logits)                         (routing, fp32 or wider)
    ids     = the k largest p per token, ties to the lower index
    w       = p[ids] / sum p[ids]
    y_t     = sum_j w_tj W_down[e] (silu(W_gate[e] x_t) * (W_up[e] x_t)),  e = ids[t, j]

Two independent forms: `fused_moe_loop_ref`, a loop over (token, choice)
pairs, and `fused_moe_ref`, which runs every expert on every token and then
picks the routed outputs (E times the work, but a handful of batched products,
so tests can differentiate it quickly). Both are differentiable.
"""

from __future__ import annotations

import torch


def moe_route_ref(router_logits: torch.Tensor, top_k: int, dtype: torch.dtype = torch.float64):
    """(topk_weights [T, k] in `dtype`, topk_ids [T, k] int64), one token at a time."""
    probs = torch.softmax(router_logits.to(dtype), dim=-1)
    weights, ids = [], []
    for t in range(probs.shape[0]):
        row = probs[t]
        # Largest first; among equal values the lower index (Python's sort is stable).
        chosen = sorted(range(row.shape[0]), key=lambda e: -row[e].item())[:top_k]
        ids.append(chosen)
        picked = row[chosen]
        weights.append(picked / picked.sum())
    ids_t = torch.tensor(ids, dtype=torch.int64).reshape(probs.shape[0], top_k)
    w_t = torch.stack(weights) if weights else probs.new_zeros(0, top_k)
    return w_t, ids_t


def fused_moe_ref(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """y [T, D] in `dtype`: every expert on every token, then the routed sum."""
    F = w_gate_up.shape[1] // 2
    x, w_gate_up, w_down, topk_weights = (t.to(dtype) for t in (x, w_gate_up, w_down, topk_weights))
    h = torch.einsum("td,efd->tef", x, w_gate_up)  # [T, E, 2F]: every expert's pre-activation
    a = torch.nn.functional.silu(h[..., :F]) * h[..., F:]  # [T, E, F]
    out = torch.einsum("tef,edf->ted", a, w_down)  # [T, E, D]: every expert's output
    routed = out.gather(1, topk_ids.long()[..., None].expand(-1, -1, out.shape[-1]))  # [T, k, D]
    return (topk_weights[..., None] * routed).sum(dim=1)


def fused_moe_loop_ref(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """y [T, D] in `dtype`: the loop over (token, choice) pairs."""
    F = w_gate_up.shape[1] // 2
    x, w_gate_up, w_down, topk_weights = (t.to(dtype) for t in (x, w_gate_up, w_down, topk_weights))
    rows = []
    for t in range(x.shape[0]):
        y_t = x.new_zeros(w_down.shape[1])
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            h = w_gate_up[e] @ x[t]  # [2F]
            gate, up = h[:F], h[F:]
            a = torch.nn.functional.silu(gate) * up  # [F]
            y_t = y_t + topk_weights[t, j] * (w_down[e] @ a)
        rows.append(y_t)
    return torch.stack(rows) if rows else x.new_zeros(0, w_down.shape[1])
