"""Fused MoE on the CPU: m1 against transformers' per-expert loop and a dense torch.mm.

    python bench/bench_moe.py [--tokens 16 512 4096 16384] [--dtypes float32 bfloat16]

MiniMax-M1's expert shape scaled down to fit the CPU: D=1024, F=1536, E=32, k=2,
softmax top-2 routing of random logits. For each token count T and dtype, in one run:

  m1           m1ops.fused_moe (forward), and forward + backward through autograd
               (gradients for x, both weights and the routing weights);
  loop         the experts of transformers' MoE block (MixtralExperts.forward, which
               MiniMax uses), reimplemented below: a Python loop over the experts that
               received tokens, index gathers, F.linear in the input dtype, index_add_;
               forward, and forward + backward under autograd;
  dense mm     one fp32 torch.mm [T*k, D] @ [D, 3F]: the same FLOPs as the forward
               (2 T k D 3F) as a single dense product, the machine's ceiling;
  weight read  the time to read the weights of the experts that received tokens once,
               at the memory bandwidth measured in the same run (a streaming sum of a
               large fp32 buffer): the floor of a forward at small T.

FLOPs: forward 6 T k D F; forward + backward 18 T k D F (m1 keeps the gate/up
pre-activations, so its backward does 6 of the 9 units without recomputing).
Times are the best of N interleaved runs (the functions compared take turns,
so they see the same load from other processes); ratios compare numbers of
the same run.

A second table measures that memory/time trade: m1's backward alone with the
saved [T*k, 2F] pre-activations against the same backward recomputing them.

--cpu-time runs everything on one thread and measures process CPU time
instead of wall time: on a machine shared with other jobs, wall-clock ratios
swing by 10x (the loop's many small parallel regions suffer most from
oversubscription), while one thread's CPU time barely moves. It answers a
narrower question (single-core efficiency, no threading overheads) and says
so in its JSON (results/moe_cpu_time.json).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from common import memory_read_gbs, print_table, write_json

import m1ops

D, FFN, E, K = 1024, 1536, 32, 2


def transformers_experts(x, w_gate_up, w_down, topk_weights, topk_ids):
    """The experts of transformers' Mixtral/MiniMax MoE block: one iteration per expert hit."""
    final = torch.zeros_like(x)
    with torch.no_grad():
        mask = F.one_hot(topk_ids, num_classes=w_gate_up.shape[0]).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        pos, tok = torch.where(mask[e])
        gate, up = F.linear(x[tok], w_gate_up[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w_down[e])
        h = h * topk_weights[tok, pos, None]
        final.index_add_(0, tok, h.to(final.dtype))
    return final


CLOCK = time.perf_counter  # --cpu-time: time.process_time on one thread


def once_ms(fn) -> float:
    t0 = CLOCK()
    fn()
    return (CLOCK() - t0) * 1e3


def interleaved_ms(fns: dict[str, Callable[[], object]], budget_s: float, max_repeat: int = 10) -> dict[str, float]:
    """Best-of-N wall time (ms) of each fn. The fns run in turn, N times, so that
    they see the same machine load (other processes share these cores); N fits
    the budget. A first round warms up; when one round already exceeds the
    budget, that round is the measurement (multi-second runs need no warm-up)."""
    first = {k: once_ms(f) for k, f in fns.items()}
    repeat = min(max_repeat, int(budget_s * 1e3 / max(sum(first.values()), 1e-3)))
    if repeat < 1:
        return first
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            times[k].append(once_ms(f))
    return {k: min(v) for k, v in times.items()}


def fwd_bwd(fn, x, w_gate_up, w_down, topk_weights, topk_ids, grad_y):
    leaves = [t.detach().requires_grad_() for t in (x, w_gate_up, w_down, topk_weights)]

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves, topk_ids).backward(grad_y)

    return run


def main() -> None:
    global D, FFN, E, K
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 512, 4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds per comparison (1 to 10 rounds)")
    parser.add_argument("--cpu-time", action="store_true", help="one thread, process CPU time (see above)")
    parser.add_argument("--shape", type=int, nargs=4, metavar=("D", "F", "E", "k"), default=[D, FFN, E, K],
                        help="expert shape (bench/run.py --smoke uses a toy one)")
    args = parser.parse_args()
    D, FFN, E, K = args.shape
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
        torch.set_num_threads(1)

    torch.manual_seed(0)
    bandwidth = memory_read_gbs()
    print(f"D={D} F={FFN} E={E} k={K}, {torch.get_num_threads()} threads, "
          f"{'process CPU time' if args.cpu_time else 'wall time'}, memory read {bandwidth:.1f} GB/s")
    rows = []
    for T in args.tokens:
        logits = torch.randn(T, E)
        topk_weights, topk_ids = m1ops.moe_route(logits, K)
        hit = int(torch.unique(topk_ids).numel())
        dense_a, dense_b = torch.randn(T * K, D), torch.randn(D, 3 * FFN)
        fwd_flops = 6 * T * K * D * FFN
        for name in args.dtypes:
            dtype = getattr(torch, name)
            x = torch.randn(T, D).to(dtype)
            w_gate_up = (torch.randn(E, 2 * FFN, D) / D**0.5).to(dtype)
            w_down = (torch.randn(E, D, FFN) / FFN**0.5).to(dtype)
            grad_y = torch.randn(T, D).to(dtype)
            inputs = (x, w_gate_up, w_down, topk_weights, topk_ids)
            with torch.no_grad():
                fwd = interleaved_ms({"m1": lambda: m1ops.fused_moe(*inputs),
                                      "loop": lambda: transformers_experts(*inputs),
                                      "dense": lambda: torch.mm(dense_a, dense_b)}, args.budget)
            fb = interleaved_ms({"m1": fwd_bwd(m1ops.fused_moe, *inputs, grad_y),
                                 "loop": fwd_bwd(transformers_experts, *inputs, grad_y)}, args.budget)
            m1_fwd, loop_fwd, dense_ms, m1_fb, loop_fb = fwd["m1"], fwd["loop"], fwd["dense"], fb["m1"], fb["loop"]
            weight_bytes = hit * 3 * FFN * D * x.element_size()
            floor_ms = weight_bytes / (bandwidth * 1e9) * 1e3
            rows.append(dict(
                T=T, dtype=name, experts_hit=hit,
                m1_fwd_ms=m1_fwd, loop_fwd_ms=loop_fwd, fwd_speedup=loop_fwd / m1_fwd,
                m1_fwd_gflops=fwd_flops / (m1_fwd * 1e-3) / 1e9,
                dense_mm_ms=dense_ms, dense_mm_gflops=fwd_flops / (dense_ms * 1e-3) / 1e9,
                fwd_vs_dense=dense_ms / m1_fwd, weight_read_ms=floor_ms, fwd_vs_floor=m1_fwd / floor_ms,
                m1_fwd_bwd_ms=m1_fb, loop_fwd_bwd_ms=loop_fb, fwd_bwd_speedup=loop_fb / m1_fb,
                m1_fwd_bwd_gflops=3 * fwd_flops / (m1_fb * 1e-3) / 1e9,
                fwd_bwd_vs_dense=3 * dense_ms / m1_fb,
            ))
            r = rows[-1]
            print(f"T={T:5d} {name:8s} fwd {m1_fwd:9.1f} ms (loop {loop_fwd:9.1f}, {r['fwd_speedup']:5.2f}x, "
                  f"{r['fwd_vs_dense']:.0%} of mm)  fwd+bwd {m1_fb:9.1f} ms (loop {loop_fb:9.1f}, "
                  f"{r['fwd_bwd_speedup']:5.2f}x)", flush=True)
    trade = []
    for T in [t for t in args.tokens if t >= 512]:
        for name in args.dtypes:
            dtype = getattr(torch, name)
            x = torch.randn(T, D).to(dtype)
            w_gate_up = (torch.randn(E, 2 * FFN, D) / D**0.5).to(dtype)
            w_down = (torch.randn(E, D, FFN) / FFN**0.5).to(dtype)
            topk_weights, topk_ids = m1ops.moe_route(torch.randn(T, E), K)
            grad_y = torch.randn(T, D).to(dtype)
            inputs = (x, w_gate_up, w_down, topk_weights, topk_ids)
            _, gate_up = torch.ops.m1.fused_moe(*inputs, save_gate_up=True)
            bwd = interleaved_ms({"saved": lambda: m1ops.fused_moe_backward(grad_y, *inputs, gate_up),
                                  "recomputed": lambda: m1ops.fused_moe_backward(grad_y, *inputs, None)}, args.budget)
            saved, recomputed = bwd["saved"], bwd["recomputed"]
            trade.append(dict(T=T, dtype=name, saved_mb=gate_up.numel() * gate_up.element_size() / 2**20,
                              bwd_saved_ms=saved, bwd_recomputed_ms=recomputed, recompute_cost=recomputed / saved))
    print()
    print_table(rows, [("T", "T", "d"), ("dtype", "dtype", "s"), ("m1_fwd_ms", "m1 fwd ms", ".1f"),
                       ("loop_fwd_ms", "loop fwd ms", ".1f"), ("fwd_speedup", "x loop", ".2f"),
                       ("m1_fwd_gflops", "m1 GF/s", ".0f"), ("dense_mm_gflops", "mm GF/s", ".0f"),
                       ("fwd_vs_dense", "of mm", ".2f"), ("weight_read_ms", "w-read ms", ".1f"),
                       ("fwd_vs_floor", "x floor", ".2f"), ("m1_fwd_bwd_ms", "m1 f+b ms", ".1f"),
                       ("loop_fwd_bwd_ms", "loop f+b ms", ".1f"), ("fwd_bwd_speedup", "x loop", ".2f"),
                       ("fwd_bwd_vs_dense", "f+b of mm", ".2f")])
    if trade:
        print()
        print_table(trade, [("T", "T", "d"), ("dtype", "dtype", "s"), ("saved_mb", "saved h MB", ".0f"),
                            ("bwd_saved_ms", "bwd (saved h) ms", ".1f"),
                            ("bwd_recomputed_ms", "bwd (recompute h) ms", ".1f"),
                            ("recompute_cost", "recompute / saved", ".2f")])
    write_json("moe_cpu_time" if args.cpu_time else "moe",
               {"shape": dict(D=D, F=FFN, E=E, k=K), "clock": "process CPU time, 1 thread" if args.cpu_time else
                "wall time", "memory_read_gbs": bandwidth, "rows": rows, "saved_vs_recomputed": trade})


if __name__ == "__main__":
    main()
