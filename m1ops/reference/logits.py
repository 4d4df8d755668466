"""FP32 logits head references (DESIGN 3.3), written from the math.

Shapes: N tokens, D model dim, V vocabulary.

    z = hidden @ weight^T / temperature                    [N, V]
    lse_n = log sum_j exp(z_nj)
    logprob_n = z_{n, t_n} - lse_n                         0 where t_n == ignore_index
    entropy_n = -sum_j p_nj log p_nj,  p = exp(z - lse)    0 where t_n == ignore_index

These materialise z (they are references, not kernels) and compute in float64
by default; autograd through them gives the reference gradients.
"""

from __future__ import annotations

import torch


def fp32_logprobs_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (logprobs [N], entropy [N], lse [N]) in `dtype`; differentiable in hidden and weight."""
    z = (hidden.to(dtype) @ weight.to(dtype).T) / temperature  # [N, V]
    lse = torch.logsumexp(z, dim=-1)  # [N]
    logp = z - lse[:, None]  # [N, V]
    entropy = torch.special.entr(logp.exp()).sum(-1)  # entr(p) = -p log p, 0 at p = 0
    ignored = targets == ignore_index
    picked = logp.gather(1, torch.where(ignored, 0, targets)[:, None])[:, 0]
    zero = torch.zeros((), dtype=dtype, device=z.device)
    return torch.where(ignored, zero, picked), torch.where(ignored, zero, entropy), lse


def fp32_logits_ref(hidden: torch.Tensor, weight: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """hidden @ weight^T in `dtype`: [N, V]."""
    return hidden.to(dtype) @ weight.to(dtype).T
