"""The build: what build_info() reports, the torch-version guard, and the one source list."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import m1ops
from m1ops._build import check_torch_version

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_describes_this_build():
    info = m1ops.build_info()
    assert info["torch"] == torch.__version__ == info["torch_runtime"]
    assert "lightning_attn_decode" in info["ops"]
    assert all("CPU" in devices for devices in info["ops"].values()), "every op has a CPU kernel"
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build names its archs"
        assert info["cutlass"]["version"].startswith("4."), info["cutlass"]
        assert "CUDA" in info["ops"]["lightning_attn_decode"]
    else:
        assert all(devices == ["CPU"] for devices in info["ops"].values())
    assert info["cpu_gemm"] in ("blas (sgemm_)", "portable loop")
    assert isinstance(info["cpu_avx512"], bool) and isinstance(info["cpu_avx512_bf16"], bool)
    assert info["cpu_avx512"] or not info["cpu_avx512_bf16"]  # the BF16 dot products come with AVX-512


def test_every_op_has_a_wrapper_and_a_fake_impl():
    for name in m1ops.build_info()["ops"]:
        assert callable(getattr(m1ops, name, None)) or name.startswith("_"), f"m1ops.{name} wrapper missing"
        op = getattr(torch.ops.m1, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), f"{name} has no fake impl"


def test_torch_version_guard_message():
    check_torch_version("2.14.1+cu130", "2.14.1+cu130")
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0.*2\.14\.1.*Rebuild"):
        check_torch_version("2.13.0", "2.14.1")


def test_import_under_another_torch_says_rebuild():
    """A real import with torch reporting another version fails before loading _C."""
    code = "import torch; torch.__version__ = '0.0.1'; import m1ops"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests",
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode != 0
    assert "built against torch" in proc.stderr and "Rebuild" in proc.stderr, proc.stderr[-2000:]


def test_sources_txt_lists_every_source():
    """setup.py and CMake build what csrc/sources.txt lists: a file missing from it is built by neither."""
    listed = set()
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].split()
        if line:
            kind, path = line
            assert kind in {"cpu", "cuda", "cuda_sm90", "torch", "torch_cuda", "test"}, kind
            listed.add(path)
    on_disk = {str(p.relative_to(ROOT / "csrc")) for ext in ("*.cpp", "*.cu") for p in (ROOT / "csrc").rglob(ext)}
    assert on_disk == listed, f"unlisted: {sorted(on_disk - listed)}, missing: {sorted(listed - on_disk)}"


def test_readme_has_the_ci_test_command():
    lines = (ROOT / "README.md").read_text().splitlines()
    i = lines.index("<!-- ci: test command -->")
    assert lines[i + 1].startswith("```") and "pytest" in lines[i + 2]
