"""Runs every m1 op on the CPU against its float64 reference and prints a table.

    python -m m1ops.selfcheck [--repeat N] [--json PATH]

Each case draws fresh random inputs, runs the kernel and the reference from
m1ops.reference on them, and reports the relative error ||out - ref|| / ||ref||
of every output against its budget (DESIGN 4), and the median time of both.
Exits non-zero when any output is over budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import m1ops
from m1ops.reference import (
    fp32_logits_ref,
    fp32_logprobs_ref,
    fused_moe_ref,
    lightning_attn_decode_ref,
    lightning_attn_ref,
)

Outputs = dict[str, torch.Tensor]


@dataclass
class Case:
    op: str
    shape: str
    dtype: torch.dtype
    kernel: Callable[[], Outputs]  # runs the m1 op
    reference: Callable[[], Outputs]  # runs the float64 reference on the same inputs
    tol: float  # relative-error budget for every output
    timed: Callable[[], object] | None = None  # what to time instead of `kernel` (e.g. without copies)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def lightning_decode_cases() -> list[Case]:
    cases = []
    # MiniMax-M1 decode shape per layer (H=64, K=V=128), batch 1 and 8.
    for B, dtype, tol in [(1, torch.float32, 1e-5), (8, torch.float32, 1e-5), (1, torch.bfloat16, 2.0**-8 + 1e-5)]:
        H, K, V = 64, 128, 128
        q, k = torch.randn(B, H, K).to(dtype), torch.randn(B, H, K).to(dtype)
        v = torch.randn(B, H, V).to(dtype)
        slope = torch.rand(H)
        state = torch.randn(B, H, K, V)

        def kernel(q=q, k=k, v=v, slope=slope, state=state):
            s = state.clone()
            return {"o": m1ops.lightning_attn_decode(q, k, v, slope, s), "state": s}

        def reference(q=q, k=k, v=v, slope=slope, state=state):
            o, s = lightning_attn_decode_ref(q, k, v, slope, state.clone())
            return {"o": o, "state": s}

        # Timed in place on one state (the op's real use): no copy in the loop.
        bench_state = state.clone()
        timed = lambda q=q, k=k, v=v, slope=slope, s=bench_state: m1ops.lightning_attn_decode(q, k, v, slope, s)  # noqa: E731
        cases.append(Case("lightning_attn_decode", f"B={B} H={H} K={K} V={V}", dtype, kernel, reference, tol, timed))
    return cases


def lightning_cases() -> list[Case]:
    """Blockwise prefill (forward, and forward + backward) with a carried state, dense and varlen."""
    cases = []
    H, K, V = 4, 128, 128
    # (B, T, cu_seqlens, dtype, budget): fp32 accumulation; bf16 rounds each output once (2^-8).
    configs = [
        (2, 1000, None, torch.float32, 1e-5),
        (2, 1000, None, torch.bfloat16, 2.0**-8 + 1e-5),
        (1, 1200, [0, 1, 1, 700, 1200], torch.float32, 1e-5),
    ]
    for B, T, cu, dtype, tol in configs:
        cu_t = None if cu is None else torch.tensor(cu)
        N = B if cu is None else len(cu) - 1
        q = torch.randn(B, T, H, K).to(dtype)
        k = (torch.randn(B, T, H, K) / K**0.5).to(dtype)
        v = torch.randn(B, T, H, V).to(dtype)
        slope = torch.logspace(-3, 0, H)
        s0 = torch.randn(N, H, K, V)
        shape = f"T={T} H={H} K=V={K} " + (f"B={B}" if cu is None else f"N={N}")

        def kernel(q=q, k=k, v=v, slope=slope, s0=s0, cu=cu_t):
            o, final = m1ops.lightning_attn(q, k, v, slope, initial_state=s0, output_final_state=True, cu_seqlens=cu)
            return {"o": o, "final": final}

        def reference(q=q, k=k, v=v, slope=slope, s0=s0, cu=cu_t):
            o, final = lightning_attn_ref(q, k, v, slope, initial_state=s0, cu_seqlens=cu)
            return {"o": o, "final": final}

        cases.append(Case("lightning_attn", shape, dtype, kernel, reference, tol))
        if dtype != torch.float32:
            continue
        do, dfinal = torch.randn(B, T, H, V), torch.randn(N, H, K, V)

        def grads(fn, dtype, q=q, k=k, v=v, slope=slope, s0=s0, cu=cu_t, do=do, dfinal=dfinal):
            leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, s0)]
            o, final = fn(*leaves[:3], slope, initial_state=leaves[3], cu_seqlens=cu)
            dq, dk, dv, ds0 = torch.autograd.grad([o, final], leaves, [do.to(dtype), dfinal.to(dtype)])
            return {"dq": dq, "dk": dk, "dv": dv, "d_state": ds0}

        def m1_fn(q, k, v, slope, **kw):
            return m1ops.lightning_attn(q, k, v, slope, output_final_state=True, **kw)

        cases.append(Case("lightning_attn fwd+bwd", shape, dtype, lambda g=grads, f=m1_fn: g(f, torch.float32),
                          lambda g=grads: g(lightning_attn_ref, torch.float64), tol))
    return cases


def moe_cases() -> list[Case]:
    """fused_moe forward and backward (every gradient) on a scaled-down M1 MoE layer."""
    cases = []
    T, D, F, E, k = 256, 512, 768, 8, 2
    # fp32: products of length <= 768 in fp32; bf16: outputs rounded once to bf16
    # (and the saved pre-activations too), see tests/test_moe.py.
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 4 * 2.0**-9)]:
        x = torch.randn(T, D).to(dtype)
        w_gate_up = (torch.randn(E, 2 * F, D) / D**0.5).to(dtype)
        w_down = (torch.randn(E, D, F) / F**0.5).to(dtype)
        topk_weights, topk_ids = m1ops.moe_route(torch.randn(T, E), k)
        grad_y = torch.randn(T, D).to(dtype)
        names = ("dx", "dWgu", "dWdown", "dw")  # gradients of x, w_gate_up, w_down, topk_weights

        def kernel(x=x, wgu=w_gate_up, wd=w_down, tw=topk_weights, ids=topk_ids, g=grad_y):
            leaves = [t.clone().requires_grad_() for t in (x, wgu, wd, tw)]
            y = m1ops.fused_moe(*leaves, ids)
            grads = torch.autograd.grad(y, leaves, g)
            return {"y": y, **dict(zip(names, grads))}

        def reference(x=x, wgu=w_gate_up, wd=w_down, tw=topk_weights, ids=topk_ids, g=grad_y):
            leaves = [t.double().requires_grad_() for t in (x, wgu, wd, tw)]
            y = fused_moe_ref(*leaves, ids)
            grads = torch.autograd.grad(y, leaves, g.double())
            return {"y": y, **dict(zip(names, grads))}

        cases.append(Case("fused_moe (fwd+bwd)", f"T{T} D{D} F{F} E{E} k{k}", dtype, kernel, reference, tol))
    return cases


def logits_cases() -> list[Case]:
    """FP32 head at a 32K vocabulary: log-probs + entropy, their gradients, and logits for sampling.

    Outputs are fp32 from exact fp32 products of the (widened) inputs: budget 1e-5 as in DESIGN 4;
    bf16 gradients add one bf16 rounding (2^-8).
    """
    cases = []
    N, D, V = 256, 1024, 32768
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(N, D).to(dtype)
        weight = (torch.randn(V, D) * 3 / D**0.5).to(dtype)  # logits with std ~3
        targets = torch.randint(0, V, (N,))
        targets[::16] = -100

        def kernel(h=hidden, w=weight, t=targets):
            lp, ent = m1ops.fp32_logprobs(h, w, t, temperature=0.9, return_entropy=True)
            return {"logprob": lp, "entropy": ent}

        def reference(h=hidden, w=weight, t=targets):
            lp, ent, _ = fp32_logprobs_ref(h, w, t, temperature=0.9)
            return {"logprob": lp, "entropy": ent}

        cases.append(Case("fp32_logprobs", f"N={N} D={D} V={V}", dtype, kernel, reference, 1e-5))

        g = torch.randn(N)

        def grads(h=hidden, w=weight, t=targets, g=g):
            h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
            lp, ent = m1ops.fp32_logprobs(h, w, t, temperature=0.9, return_entropy=True)
            ((lp * g).sum() + 0.1 * ent.sum()).backward()
            return {"grad_h": h.grad, "grad_w": w.grad}

        def grads_ref(h=hidden, w=weight, t=targets, g=g):
            h, w = h.double().requires_grad_(), w.double().requires_grad_()
            lp, ent, _ = fp32_logprobs_ref(h, w, t, temperature=0.9)
            ((lp * g.double()).sum() + 0.1 * ent.sum()).backward()
            return {"grad_h": h.grad, "grad_w": w.grad}

        tol = 1e-5 + (2.0**-8 if dtype == torch.bfloat16 else 0.0)
        cases.append(Case("fp32_logprobs backward", f"N={N} D={D} V={V}", dtype, grads, grads_ref, tol))

    hidden, weight = torch.randn(64, D).bfloat16(), (torch.randn(V, D) / D**0.5).bfloat16()
    cases.append(Case("fp32_logits", f"N=64 D={D} V={V}", torch.bfloat16,
                      lambda: {"logits": m1ops.fp32_logits(hidden, weight)},
                      lambda: {"logits": fp32_logits_ref(hidden, weight)}, 1e-5))
    return cases


ALL_CASES: list[Callable[[], list[Case]]] = [lightning_decode_cases, lightning_cases, moe_cases, logits_cases]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per case (median reported)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    info = m1ops.build_info()
    print(
        f"m1 self-check: torch {info['torch_runtime']}, {torch.get_num_threads()} CPU threads, "
        f"CPU GEMM {info['cpu_gemm']}, CUDA kernels {'for ' + ';'.join(info['cuda_archs']) if info['cuda'] else 'not built'}"
    )
    header = f"{'op':<24} {'shape':<24} {'dtype':<9} {'output':<7} {'rel err':>9} {'budget':>8}  {'m1 ms':>8} {'ref ms':>8} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    rows, failed = [], 0
    for make in ALL_CASES:
        for case in make():
            outs, refs = case.kernel(), case.reference()
            ours_ms, ref_ms = median_ms(case.timed or case.kernel, args.repeat), median_ms(case.reference, max(3, args.repeat // 4))
            for i, (name, ref) in enumerate(refs.items()):
                err = rel_err(outs[name], ref)
                ok = err <= case.tol
                failed += not ok
                timing = f"{ours_ms:8.3f} {ref_ms:8.3f} {ref_ms / ours_ms:7.1f}x" if i == 0 else ""
                dtype = str(case.dtype).removeprefix("torch.")
                print(
                    f"{case.op:<24} {case.shape:<24} {dtype:<9} {name:<7} {err:9.2e} {case.tol:8.1e}"
                    f"{'' if ok else ' FAIL'}  {timing}"
                )
                rows.append(dict(op=case.op, shape=case.shape, dtype=dtype, output=name, rel_err=err, tol=case.tol,
                                 ok=ok, m1_ms=ours_ms, ref_ms=ref_ms))
    print("-" * len(header))
    print("all outputs within budget" if not failed else f"{failed} output(s) over budget")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"build_info": info, "rows": rows}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
