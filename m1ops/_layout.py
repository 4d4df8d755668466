"""Input layouts the kernels take, from whatever strides the caller has.

The torch.ops.m1 ops read raw pointers: rows must be contiguous (unit stride in
the last dimension; other strides are free, so slices of a fused projection
pass without a copy) and weights, routing tables and states fully contiguous.
They raise a ValueError otherwise. The m1ops wrappers call these helpers
first, so a user's transposed or strided tensor costs one copy instead of an
error; both helpers return the tensor itself when it already fits.
"""

from __future__ import annotations

import torch


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy when its last dimension is not unit-stride."""
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()


def dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """t made contiguous (None passes through)."""
    return None if t is None else t.contiguous()
