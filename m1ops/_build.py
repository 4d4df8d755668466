"""Loading m1ops._C and describing what it contains (m1ops.build_info())."""

from __future__ import annotations

import ctypes
import importlib
import json
from pathlib import Path

import torch

_INFO_FILE = Path(__file__).with_name("_build_info.json")
_REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall .  (or: pip install --no-build-isolation -e .)"


def _read_build_file() -> dict:
    if not _INFO_FILE.is_file():
        raise ImportError(
            f"m1ops: the compiled extension is not built next to {Path(__file__).parent}. "
            f"With torch installed, build it from the repository root: {_REBUILD}"
        )
    return json.loads(_INFO_FILE.read_text())


def check_torch_version(built_against: str, running: str) -> None:
    """The C++ ABI of torch changes between releases and builds: insist on the same one."""
    if built_against != running:
        raise ImportError(
            f"m1ops._C was built against torch {built_against}, but torch {running} is installed. "
            f"Rebuild m1 against the installed torch: {_REBUILD}"
        )


def load_extension() -> None:
    """Imports m1ops._C (its static initialisers register the torch.ops.m1 kernels)."""
    check_torch_version(_read_build_file()["torch"], torch.__version__)
    importlib.import_module("m1ops._C")


def m1_op_names() -> list[str]:
    """Names of every op in the m1 namespace, from the dispatcher."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("m1::"))


def build_info() -> dict:
    """What this build of m1 contains.

    torch: the torch it was built against; cuda / cuda_archs: whether CUDA
    kernels were compiled and for which archs; cutlass: version and source of
    the headers; ops: for every torch.ops.m1 op, the devices with a kernel;
    cpu_gemm: the GEMM the CPU kernels call on tiles; cpu_avx512 / cpu_avx512_bf16: whether
    this CPU runs the AVX-512 (AVX512-BF16) kernels; lightning_max_head_dim /
    cuda_lightning_head_dims: the head dims lightning_attn takes on any device / on CUDA.
    """
    info = _read_build_file()
    info["torch_runtime"] = torch.__version__
    lib = ctypes.CDLL(importlib.import_module("m1ops._C").__file__)
    lib.m1_runtime_info.restype = ctypes.c_char_p
    info.update(json.loads(lib.m1_runtime_info().decode()))
    info["ops"] = {
        name: [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"m1::{name}", key)]
        for name in m1_op_names()
    }
    return info
