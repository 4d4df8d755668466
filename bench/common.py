"""Shared benchmark plumbing: timing, the machine's matmul ceiling, tables, JSON.

Every benchmark reports ratios measured in one run (ours against a reference
or a peer, and achieved FLOP/s against torch.mm's rate measured in the same
process), never absolute times compared across runs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

# bench/run.py points M1_BENCH_RESULTS elsewhere for its --quick and --smoke runs.
RESULTS = Path(os.environ.get("M1_BENCH_RESULTS") or Path(__file__).parent / "results")


def time_ms(fn: Callable[[], object], *, repeat: int = 10, warmup: int = 2, min_time_s: float = 0.0) -> float:
    """Median wall time of fn() in milliseconds (CUDA is synchronised around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start) < min_time_s:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def mm_gflops(n: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """torch.mm rate on an n x n x n product: the ceiling the kernels are measured against."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = time_ms(lambda: torch.mm(a, b), repeat=5, warmup=2)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def memory_read_gbs(mb: int = 256) -> float:
    """Rate of a streaming sum over a buffer well beyond the caches (GB/s): what weight-bound
    steps (decoding, few-row GEMMs) are limited by; on a shared host it drifts with the load."""
    buf = torch.ones(mb * 2**20 // 4)
    ms = time_ms(lambda: buf.sum(), repeat=5, warmup=1)
    return buf.numel() * 4 / (ms * 1e-3) / 1e9


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec such as '>10.3f')."""
    widths = [max(len(h), *(len(format(r[k], f)) if r.get(k) is not None else 1 for r in rows)) for k, h, f in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for r in rows:
        cells = [format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")
    return path
