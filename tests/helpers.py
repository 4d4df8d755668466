"""Shared test utilities: relative error, poisoned outputs, devices, dtypes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

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


def gapped(t: torch.Tensor) -> torch.Tensor:
    """The same values with a last-dimension stride of 2 (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def transposed(t: torch.Tensor, dims: tuple[int, int] = (-1, -2)) -> torch.Tensor:
    """The same values stored with the two dimensions `dims` swapped in memory."""
    return t.transpose(*dims).contiguous().transpose(*dims)


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"m1_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
