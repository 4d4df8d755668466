"""Fused MoE forward on CUDA: the fused gate/up kernel against the unfused path, same run.

    python bench/bench_moe_cuda.py [--tokens 16 512 4096 16384] [--dtypes bfloat16 float16]

Needs a GPU (exits with a message otherwise). Expert shape as bench_moe.py
(D=1024, F=1536, E=32, k=2; --dim/--ffn to change), softmax top-2 routing of
random logits. For each T and dtype, interleaved in one run:

  fused     m1ops.fused_moe with x contiguous: gate/up is the fused grouped dual
            GEMM (csrc/moe/moe_gate_up_cuda.cu: row gather in the A load,
            SiLU * up * routing weight in the epilogue), then the CUTLASS down GEMM;
  unfused   the same op with x a view at an odd element offset: its rows are not
            16-byte vectors, so the forward takes the previous path (gather of x,
            CUTLASS grouped GEMM over 2F columns, elementwise SiLU * up pass). Its
            gather copies elements one at a time (the aligned path copied 16-byte
            vectors), so this slightly overstates the old path's cost at large D;
  dense mm  one torch.mm [T*k, D] @ [D, 3F] in the dtype: the same FLOPs as the
            forward (6 T k D F) as one dense product, the GPU's ceiling here.

Both m1 variants return the saved pre-activations too (save_gate_up=True, as
under autograd) and also without them (inference). Each time is the best,
over interleaved rounds, of a round's median; ratios compare numbers of the
same run. JSON to
bench/results/moe_cuda.json.
"""

from __future__ import annotations

import argparse

import torch
from common import print_table, time_ms, write_json

import m1ops

# float32 takes the fused kernel whatever x's layout (scalar loads): no unfused variant to compare.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def odd_offset(x: torch.Tensor) -> torch.Tensor:
    """x's values in a view whose rows start one element past a 16-byte boundary."""
    wide = torch.empty(x.shape[0], x.shape[1] + 1, dtype=x.dtype, device=x.device)
    wide[:, 1:] = x
    return wide[:, 1:]


def run(T: int, dim: int, ffn: int, experts: int, k: int, dtype: torch.dtype, repeat: int) -> dict:
    x = torch.randn(T, dim, device="cuda").to(dtype)
    w_gate_up = (torch.randn(experts, 2 * ffn, dim, device="cuda") / dim**0.5).to(dtype)
    w_down = (torch.randn(experts, dim, ffn, device="cuda") / ffn**0.5).to(dtype)
    topk_weights, topk_ids = m1ops.moe_route(torch.randn(T, experts, device="cuda"), k)
    x_odd = odd_offset(x)
    a = torch.randn(T * k, dim, device="cuda").to(dtype)
    b = torch.randn(dim, 3 * ffn, device="cuda").to(dtype)

    def fwd(xx, save):
        return lambda: torch.ops.m1.fused_moe(xx, w_gate_up, w_down, topk_weights, topk_ids, save_gate_up=save)

    fns = {
        "fused": fwd(x, False),
        "unfused": fwd(x_odd, False),
        "fused_save": fwd(x, True),
        "unfused_save": fwd(x_odd, True),
        "mm": lambda: torch.mm(a, b),
    }
    best: dict[str, float] = {name: float("inf") for name in fns}
    for _ in range(repeat):  # interleaved rounds: every variant sees the same GPU state
        for name, fn in fns.items():
            best[name] = min(best[name], time_ms(fn, repeat=5, warmup=1))
    flops = 6 * T * k * dim * ffn
    row = {"T": T, "dtype": str(dtype).removeprefix("torch."), **{f"{n}_ms": v for n, v in best.items()}}
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
            ("fused_tflops", "fused TFLOP/s", ".1f"), ("fused_of_mm", "of mm", ".2f"),
        ],
    )
    write_json("moe_cuda", {"shape": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
