"""FP32 logits head: m1.fp32_logprobs against the unfused PyTorch head, and what a bf16 head does to probabilities.

    python bench/bench_logits.py [--tokens 4096] [--dim 1024] [--vocab 32768 200064] [--logit-std 3]

Cases, each at N tokens, D model dim, for every vocabulary size V, forward and forward + backward:
  m1             m1ops.fp32_logprobs on fp32 hidden / weight
  m1 (bf16 in)   m1ops.fp32_logprobs on bf16 hidden / weight (still IEEE fp32 products)
  torch fp32     the unfused head: F.linear in fp32, log_softmax, gather
  torch bf16     the same in bf16: F.linear on bf16 inputs (bf16 logits), .float(), log_softmax, gather
The backward of every case takes a random upstream gradient on the log-probs.

Inputs: hidden ~ N(0, 1) (unit RMS, as after the final RMSNorm), weight ~ N(0, s^2 / D)
so that the logits have standard deviation s (--logit-std, default 3: the largest logit
of a 200K vocabulary is then ~14). Targets are sampled from the fp32 head's own
distribution (temperature 1), so they have the probabilities a rollout's tokens have.

Time: median of --repeat calls after one warm-up; a case whose first call takes more
than --long-s seconds runs once. FLOP rates count useful work, 2NDV for a forward and
6NDV for forward + backward (m1's backward recomputes the logits, so it executes 8NDV),
against torch.mm 2048^3 fp32 measured in the same run.

Memory: every case runs in a fresh subprocess. After its inputs exist it resets the
kernel's peak-RSS counter (echo 5 > /proc/self/clear_refs) and reads VmRSS; after one
call it reads VmHWM. The difference is the call's peak extra resident memory (torch's
CPU allocator returns large blocks to the OS when freed, so this is what the call held
at once; tracemalloc would not see torch's allocations). For forward + backward the
gradients of hidden and weight, which any method returns, are subtracted.

bf16 head vs fp32 head (the paper's motivation): on the same bf16 inputs and targets,
the log-probs of the "torch bf16" forward are compared with those of "m1 (bf16 in)":
Pearson correlation of the token probabilities and max / mean |log-prob difference|;
then the same at other logit scales (--sweep-std) for the first vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import mm_gflops, print_table, write_json

import m1ops

IMPLS = ["m1", "m1 (bf16 in)", "torch fp32", "torch bf16"]


def make_inputs(N: int, D: int, V: int, std: float, seed: int, bf16: bool):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (std / D**0.5)
    if bf16:
        hidden, weight = hidden.bfloat16(), weight.bfloat16()
    return hidden, weight


def torch_head(hidden, weight, targets):
    """The unfused head: logits in the inputs' dtype, log_softmax in fp32, gather."""
    logits = F.linear(hidden, weight)  # [N, V]
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]


def m1_head(hidden, weight, targets):
    return m1ops.fp32_logprobs(hidden, weight, targets)


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_child(spec: dict) -> dict:
    """One case in this (fresh) process: peak extra memory of the first call, then timings."""
    head = m1_head if spec["impl"].startswith("m1") else torch_head
    bf16 = spec["impl"] in ("m1 (bf16 in)", "torch bf16")
    hidden, weight = make_inputs(spec["N"], spec["D"], spec["V"], spec["std"], spec["seed"], bf16)
    targets = torch.load(spec["targets"])
    upstream = torch.randn(spec["N"])
    backward = spec["mode"] == "fwd+bwd"
    out = {}

    def call():
        if not backward:
            with torch.no_grad():
                out["lp"] = head(hidden, weight, targets)
            return
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        lp = head(h, w, targets)
        (lp * upstream).sum().backward()
        out["lp"] = lp.detach()

    # One small call first, so that one-time runtime set-up (thread pools, BLAS
    # buffers) is not counted as the call's memory.
    with torch.no_grad():
        head(hidden[:8], weight, targets[:8])
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        peak_reset = True
    except OSError:  # VmHWM may then hold an earlier peak: the result is an upper bound, reported as such
        peak_reset = False
    before = rss_bytes("VmRSS")
    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    peak = rss_bytes("VmHWM") - before
    grads = (hidden.numel() + weight.numel()) * hidden.element_size() if backward else 0
    times = [first_s * 1e3]
    if first_s < spec["long_s"]:
        times = []
        for _ in range(spec["repeat"]):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    if spec.get("save"):
        torch.save(out["lp"], spec["save"])
    return {"ms": statistics.median(times), "runs": len(times), "peak_extra_bytes": peak - grads,
            "grad_bytes": grads, "peak_reset": peak_reset}


def sample_targets(hidden: torch.Tensor, weight: torch.Tensor, seed: int) -> torch.Tensor:
    """Tokens drawn from the fp32 head's distribution, 256 rows at a time."""
    N = hidden.shape[0]
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for r0 in range(0, N, 256):
        probs = torch.softmax(m1ops.fp32_logits(hidden[r0:r0 + 256], weight), dim=-1)
        rows.append(torch.multinomial(probs, 1, generator=gen)[:, 0])
    return torch.cat(rows)


def spawn(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(lp_fp32: torch.Tensor, lp_bf16: torch.Tensor) -> dict:
    p32, p16 = lp_fp32.double().exp(), lp_bf16.double().exp()
    pearson = torch.corrcoef(torch.stack([p32, p16]))[0, 1].item()
    diff = (lp_fp32.double() - lp_bf16.double()).abs()
    return {"pearson_p": pearson, "max_abs_dlogp": diff.max().item(), "mean_abs_dlogp": diff.mean().item(),
            "mean_p": p32.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32768, 200064])
    parser.add_argument("--logit-std", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--long-s", type=float, default=20.0, help="cases whose first call is longer run once")
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--sweep-std", type=float, nargs="*", default=[1.0, 10.0],
                        help="more logit scales for the bf16-vs-fp32 head comparison, at the first --vocab")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    N, D, seed = args.tokens, args.dim, 0
    mm_start = mm_gflops()
    print(f"torch.mm 2048^3 fp32: {mm_start:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    rows, probs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for V in args.vocab:
            targets_path = os.path.join(tmp, f"targets_{V}.pt")
            torch.save(sample_targets(*make_inputs(N, D, V, args.logit_std, seed, bf16=True), seed), targets_path)
            saved = {}
            for impl in args.impls:
                for mode in ("fwd", "fwd+bwd"):
                    save = os.path.join(tmp, f"lp_{V}_{impl.replace(' ', '_')}.pt") if mode == "fwd" else None
                    spec = dict(impl=impl, mode=mode, N=N, D=D, V=V, std=args.logit_std, seed=seed,
                                targets=targets_path, repeat=args.repeat, long_s=args.long_s, save=save)
                    res = spawn(spec)
                    if save and "error" not in res:
                        saved[impl] = torch.load(save)
                    flops = (2 if mode == "fwd" else 6) * N * D * V
                    row = dict(V=V, impl=impl, mode=mode, **res)
                    if "ms" in res:
                        row.update(gflops=flops / (res["ms"] * 1e-3) / 1e9, peak_mib=res["peak_extra_bytes"] / 2**20,
                                   peak_pct_nv4=100 * res["peak_extra_bytes"] / (N * V * 4))
                    rows.append(row)
                    print(f"  V={V} {impl:<13} {mode:<8} " + (f"{res['ms']:9.0f} ms ({res['runs']} runs), peak extra "
                          f"{res['peak_extra_bytes'] / 2**20:7.1f} MiB" if "ms" in res else res["error"])
                          + ("" if res.get("peak_reset", True) else " (peak RSS not resettable: upper bound)"), flush=True)
            if "m1 (bf16 in)" in saved and "torch bf16" in saved:
                probs.append(dict(V=V, logit_std=args.logit_std, **compare(saved["m1 (bf16 in)"], saved["torch bf16"])))
            if "m1" in saved and "torch fp32" in saved:
                ours_vs_torch = (saved["m1"].double() - saved["torch fp32"].double()).abs().max().item()
                print(f"  V={V}: max |m1 - torch fp32| log-prob difference {ours_vs_torch:.2e}")
    # The head gap at other logit scales (in this process: no timing or memory).
    for std in args.sweep_std:
        V = args.vocab[0]
        hidden, weight = make_inputs(N, D, V, std, seed, bf16=True)
        targets = sample_targets(hidden, weight, seed)
        with torch.no_grad():
            gap = compare(m1ops.fp32_logprobs(hidden, weight, targets), torch_head(hidden, weight, targets))
        probs.append(dict(V=V, logit_std=std, **gap))
    mm_end = mm_gflops()
    mm_rate = (mm_start + mm_end) / 2
    for row in rows:
        if "gflops" in row:
            row["pct_mm"] = 100 * row["gflops"] / mm_rate
            base = next((r for r in rows if r["V"] == row["V"] and r["mode"] == row["mode"]
                         and r["impl"] == "torch fp32" and "ms" in r), None)
            row["speedup_vs_torch_fp32"] = base["ms"] / row["ms"] if base else None

    print(f"\ntorch.mm 2048^3 fp32: {mm_start:.0f} GFLOP/s at the start, {mm_end:.0f} at the end")
    print(f"N={N}, D={D}, logit std {args.logit_std}; peak extra memory as % of N*V*4 bytes (the fp32 logits)")
    print_table([r for r in rows if "ms" in r], [
        ("V", "V", "d"), ("impl", "impl", "s"), ("mode", "mode", "s"), ("ms", "ms", ".0f"),
        ("gflops", "GFLOP/s", ".0f"), ("pct_mm", "% of mm", ".0f"), ("speedup_vs_torch_fp32", "x torch fp32", ".2f"),
        ("peak_mib", "peak extra MiB", ".1f"), ("peak_pct_nv4", "% of N*V*4", ".1f")])
    if probs:
        print("\nbf16 head vs fp32 head on the same bf16 inputs, sampled tokens:")
        print_table(probs, [("V", "V", "d"), ("logit_std", "logit std", ".1f"), ("pearson_p", "Pearson(p)", ".5f"),
                            ("max_abs_dlogp", "max |dlogp|", ".3f"), ("mean_abs_dlogp", "mean |dlogp|", ".4f"),
                            ("mean_p", "mean p", ".3f")])
    write_json("logits", {"N": N, "D": D, "logit_std": args.logit_std, "mm_gflops": [mm_start, mm_end],
                          "rows": rows, "bf16_vs_fp32_head": probs})


if __name__ == "__main__":
    main()
