"""Shared test utilities: relative error, poisoned outputs, devices, dtypes."""

from __future__ import annotations

import pytest
import torch

# Devices the kernels are tested on: CPU always, CUDA when a GPU is present.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]

# Relative-error budgets against a float64 reference (DESIGN 4). bf16/fp16:
# the result is rounded once to the output dtype (relative 2^-9 = 2e-3 for bf16,
# 2^-12 = 2.4e-4 for fp16 per element) on top of fp32 accumulation; the bounds
# leave a factor of ~4 for error growth over the reduction.
REL_TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has a NaN or inf."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills a tensor with NaN so that any element a kernel fails to write shows up."""
    return t.fill_(float("nan"))


def with_(**changes):
    """For bad-input tables: mutate(args) -> a copy of the dict `args` with each key k set to f(args)."""

    def mutate(args: dict) -> dict:
        args = dict(args)
        args.update({k: f(args) for k, f in changes.items()})
        return args

    return mutate
