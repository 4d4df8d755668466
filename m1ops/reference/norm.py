"""RMSNorm reference in float64, from the formula (DESIGN 5), without the kernel's rounding of
the normalised row to x's dtype."""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> float64 [..., D]: x / sqrt(mean(x^2) + eps) * weight."""
    x64 = x.double()
    return x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * weight.double()
