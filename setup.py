"""Builds m1ops._C: CPU kernels always, CUDA kernels when torch and nvcc have CUDA.

    pip install --no-build-isolation .        (or -e .)    torch must already be installed

Environment (the only knobs):
    M1_CUDA_ARCHS   CUDA archs, ';'-separated, e.g. "8.0;9.0a" (default) or "9.0a+PTX"
    M1_FORCE_CPU=1  skip CUDA even when it is available
    DEBUG=1         -O0 -g

Sources come from csrc/sources.txt, the list CMakeLists.txt reads too. CUTLASS
headers come from third_party/cutlass (git submodule) or, when that is not
checked out, from the nvidia-cutlass pip package. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0a"
ARCH_RE = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def log(msg: str) -> None:
    print(f"[m1 build] {msg}", file=sys.stderr, flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# torch guesses CUDA_HOME from `nvcc` on PATH; on machines where that is a
# wrapper script outside the toolkit the guess is wrong, so prefer the toolkit.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time message
    sys.exit(
        "m1 builds against the torch you have installed: install torch first, then run\n"
        "    pip install --no-build-isolation .\n"
        f"({exc})"
    )


def read_sources() -> dict[str, list[str]]:
    """csrc/sources.txt as {kind: [paths relative to the repo root]}."""
    kinds: dict[str, list[str]] = {}
    for lineno, line in enumerate((CSRC / "sources.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, path = line.split()
        if not (CSRC / path).is_file():
            sys.exit(f"csrc/sources.txt:{lineno}: {path} does not exist")
        kinds.setdefault(kind, []).append(f"csrc/{path}")
    return kinds


def parse_cuda_archs(spec: str) -> list[str]:
    archs = [a.strip() for a in spec.split(";") if a.strip()]
    for arch in archs:
        if not ARCH_RE.match(arch):
            sys.exit(f"M1_CUDA_ARCHS: '{arch}' is not an arch like 8.0, 9.0a or 9.0a+PTX (got '{spec}')")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        major, minor, suffix, ptx = ARCH_RE.match(arch).groups()
        cc = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags


def find_cutlass() -> dict[str, str] | None:
    """CUTLASS include dirs: the submodule first, then the nvidia-cutlass wheel."""
    submodule = ROOT / "third_party" / "cutlass"
    if (submodule / "include" / "cutlass" / "cutlass.h").is_file():
        return {"source": "third_party/cutlass (submodule)", "include": str(submodule / "include"),
                "util_include": str(submodule / "tools" / "util" / "include")}
    # Locate the package without importing it (its Python side needs scipy etc.).
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.submodule_search_locations:
        base = Path(list(spec.submodule_search_locations)[0]) / "source"
        if (base / "include" / "cutlass" / "cutlass.h").is_file():
            return {"source": "nvidia-cutlass pip package", "include": str(base / "include"),
                    "util_include": str(base / "tools" / "util" / "include")}
    return None


def cutlass_version(include: str) -> str:
    text = (Path(include) / "cutlass" / "version.h").read_text()
    parts = [re.search(rf"#define CUTLASS_{k}\s+(\d+)", text).group(1) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(parts)


def cuda_wanted() -> bool:
    if env_flag("M1_FORCE_CPU"):
        log("M1_FORCE_CPU is set: building CPU kernels only")
        return False
    if torch.version.cuda is None:
        log(f"torch {torch.__version__} is a CPU build: building CPU kernels only")
        return False
    if CUDA_HOME is None or shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin")) is None:
        log("no CUDA toolkit found (set CUDA_HOME): building CPU kernels only")
        return False
    return True


def build_extension():
    sources = read_sources()
    debug = env_flag("DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*opt, "-std=c++20", "-fopenmp", "-DM1_WITH_ATEN"]
    include_dirs = [str(CSRC)]
    srcs = sources.get("cpu", []) + sources.get("torch", [])
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda": False, "cuda_archs": [],
            "cutlass": None, "debug": debug}

    if not cuda_wanted():
        ext = CppExtension("m1ops._C", srcs, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        return ext, info

    archs = parse_cuda_archs(os.environ.get("M1_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    cutlass = find_cutlass()
    if cutlass is None:
        sys.exit(
            "m1: CUDA kernels need the CUTLASS headers, and neither source has them:\n"
            "  - the submodule:  git submodule update --init third_party/cutlass\n"
            "  - or the wheel:   pip install --no-deps nvidia-cutlass==4.2.0.0\n"
            "or build CPU kernels only with M1_FORCE_CPU=1."
        )
    include_dirs += [cutlass["include"], cutlass["util_include"]]
    # ATen's CUDA headers include cublas_v2.h, which some toolkits (and this
    # project's CI machines) only have in torch's nvidia-* wheels.
    if not (Path(CUDA_HOME) / "include" / "cublas_v2.h").is_file():
        for site in map(Path, sys.path):
            for wheel_inc in sorted(site.glob("nvidia/cu*/include")) + [site / "nvidia" / "cublas" / "include"]:
                if (wheel_inc / "cublas_v2.h").is_file():
                    include_dirs.append(str(wheel_inc))
                    break

    srcs += sources.get("cuda", []) + sources.get("torch_cuda", [])
    if any(a.startswith("9.0a") for a in archs):
        srcs += sources.get("cuda_sm90", [])
    elif sources.get("cuda_sm90"):
        log(f"M1_CUDA_ARCHS={';'.join(archs)} has no 9.0a: skipping {', '.join(sources['cuda_sm90'])}")
    nvcc = [*opt, "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-DM1_WITH_CUDA",
            *gencode_flags(archs)]
    if not debug:
        nvcc.append("-DNDEBUG")
    info.update(cuda=True, cuda_archs=archs,
                cutlass={"version": cutlass_version(cutlass["include"]), "source": cutlass["source"]})
    log(f"CUDA {torch.version.cuda} kernels for {';'.join(archs)}; CUTLASS {info['cutlass']['version']} "
        f"from {cutlass['source']}")
    ext = CUDAExtension("m1ops._C", srcs, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx + ["-DM1_WITH_CUDA"], "nvcc": nvcc},
                        extra_link_args=["-fopenmp"])
    return ext, info


EXTENSION, BUILD_INFO = build_extension()


class BuildExt(BuildExtension):
    """torch's BuildExtension that also records what it built (m1ops.build_info())."""

    def run(self):
        super().run()
        for ext in self.extensions:
            out = Path(self.get_ext_fullpath(ext.name)).parent / "_build_info.json"
            out.write_text(json.dumps(BUILD_INFO, indent=2) + "\n")
            log(f"wrote {out}")


setup(
    packages=find_packages(include=["m1ops", "m1ops.*", "m1model", "m1model.*"]),
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExt},
)
