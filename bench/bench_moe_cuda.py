"""Fused MoE forward on CUDA: the fused gate/up kernel against the unfused path, same run.

    python bench/bench_moe_cuda.py [--tokens 16 512 4096 16384] [--dtypes bfloat16 float16 float32]

Needs a GPU (exits with a message otherwise). Expert shape as bench_moe.py
(D=1024, F=1536, E=32, k=2; --dim/--ffn to change), softmax top-2 routing of
random logits. For each T and dtype, interleaved in one run, on the same
contiguous inputs (M1_MOE_GATE_UP picks forward step 3, csrc/moe/moe_glue_cuda.cpp):

  fused     M1_MOE_GATE_UP=fused: gate/up is the fused grouped dual GEMM
            (csrc/moe/moe_gate_up_cuda.cu: row gather in the A load, SiLU * up *
            routing weight in the epilogue), then the CUTLASS down GEMM;
  unfused   M1_MOE_GATE_UP=unfused: gather of x (16-byte vectors), CUTLASS
            grouped GEMM over 2F columns, elementwise SiLU * up pass, down GEMM;
  dense mm  one torch.mm [T*k, D] @ [D, 3F] in the dtype: the same FLOPs as the
            forward (6 T k D F) as one dense product, the GPU's ceiling here.

Both m1 variants return the saved pre-activations too (save_gate_up=True, as
under autograd) and also without them (inference). The 'auto' column names
the path the default (M1_MOE_GATE_UP unset) takes on this GPU. Each time is
the best, over interleaved rounds, of a round's median; ratios compare numbers
of the same run. JSON to bench/results/moe_cuda.json.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import print_table, time_ms, write_json

import m1ops

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def with_gate_up(mode: str, fn):
    """fn run with M1_MOE_GATE_UP=mode (read by the op on every call)."""

    def call():
        previous = os.environ.get("M1_MOE_GATE_UP")
        os.environ["M1_MOE_GATE_UP"] = mode
        try:
            return fn()
        finally:
            if previous is None:
                del os.environ["M1_MOE_GATE_UP"]
            else:
                os.environ["M1_MOE_GATE_UP"] = previous

    return call


def auto_path(x, w_gate_up, w_down, topk_weights, topk_ids) -> str:
    """Which path the default takes: the one whose output it reproduces bit for bit."""
    default = torch.ops.m1.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids)[0]
    for mode in ("fused", "unfused"):
        forced = with_gate_up(mode, lambda: torch.ops.m1.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids))()
        if torch.equal(forced[0], default):
            return mode
    return "?"


def run(T: int, dim: int, ffn: int, experts: int, k: int, dtype: torch.dtype, repeat: int) -> dict:
    x = torch.randn(T, dim, device="cuda").to(dtype)
    w_gate_up = (torch.randn(experts, 2 * ffn, dim, device="cuda") / dim**0.5).to(dtype)
    w_down = (torch.randn(experts, dim, ffn, device="cuda") / ffn**0.5).to(dtype)
    topk_weights, topk_ids = m1ops.moe_route(torch.randn(T, experts, device="cuda"), k)
    a = torch.randn(T * k, dim, device="cuda").to(dtype)
    b = torch.randn(dim, 3 * ffn, device="cuda").to(dtype)

    def fwd(mode, save):
        return with_gate_up(
            mode, lambda: torch.ops.m1.fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids, save_gate_up=save)
        )

    fns = {
        "fused": fwd("fused", False),
        "unfused": fwd("unfused", False),
        "fused_save": fwd("fused", True),
        "unfused_save": fwd("unfused", True),
        "mm": lambda: torch.mm(a, b),
    }
    best: dict[str, float] = {name: float("inf") for name in fns}
    for _ in range(repeat):  # interleaved rounds: every variant sees the same GPU state
        for name, fn in fns.items():
            best[name] = min(best[name], time_ms(fn, repeat=5, warmup=1))
    flops = 6 * T * k * dim * ffn
    row = {"T": T, "dtype": str(dtype).removeprefix("torch."), **{f"{n}_ms": v for n, v in best.items()}}
    row["auto"] = auto_path(x, w_gate_up, w_down, topk_weights, topk_ids)
    row["speedup"] = best["unfused"] / best["fused"]
    row["speedup_save"] = best["unfused_save"] / best["fused_save"]
    row["fused_tflops"] = flops / (best["fused"] * 1e-3) / 1e12
    row["fused_of_mm"] = best["mm"] / best["fused"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 512, 4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=list(DTYPES))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_cuda.py needs a CUDA device")
    torch.manual_seed(0)
    rows = [
        run(T, args.dim, args.ffn, args.experts, args.topk, DTYPES[d], args.repeat)
        for d in args.dtypes
        for T in args.tokens
    ]
    print_table(
        rows,
        [
            ("dtype", "dtype", "s"), ("T", "T", "d"),
            ("fused_ms", "fused ms", ".3f"), ("unfused_ms", "unfused ms", ".3f"), ("speedup", "x", ".2f"),
            ("fused_save_ms", "fused+h ms", ".3f"), ("unfused_save_ms", "unfused+h ms", ".3f"),
            ("speedup_save", "x", ".2f"), ("mm_ms", "dense mm ms", ".3f"),
            ("fused_tflops", "fused TFLOP/s", ".1f"), ("fused_of_mm", "of mm", ".2f"), ("auto", "auto", "s"),
        ],
    )
    write_json("moe_cuda", {"shape": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
