"""Lightning attention prefill on the CPU: m1 against PyTorch blockwise and SDPA, plus decode.

    python bench/bench_lightning.py                                   # the README table
    python bench/bench_lightning.py --T 16384 --dtypes fp32 --no-sdpa  # one row
    python bench/bench_lightning.py --long --memory                   # T = 1M forward, memory vs T

Shapes: B = 1, H = 8 heads, K = V = 128, T tokens (1K..64K), fp32 and bf16 inputs.

Contenders, timed in the same process (medians):
  m1            m1ops.lightning_attn, forward and forward+backward (autograd),
                default block size (64 on the CPU) and, with --m1-block, others;
  pytorch       the blockwise algorithm as transformers' MiniMax computes it: a
                Python loop over blocks of 256, [B, H, T, D] layout, decay
                factors as tensors of the input dtype, the state in the input
                dtype; backward through autograd;
  sdpa          torch.nn.functional.scaled_dot_product_attention(is_causal=True)
                on the same q, k, v ([B, H, T, D] views): softmax attention, the
                cost lightning attention replaces.

FLOPs. Rates are counted with one model for every contender, the blockwise
algorithm at MiniMax's block size 256 (what the pytorch baseline executes):
per block of n tokens 2n^2 K (Q K^T) + 2n^2 V (scores V) + 2nKV (Q S) + 2nKV
(K^T V); forward+backward counts 3x the forward. m1's default block of 64
executes about half as many FLOPs for the same result (2n(K+V) + 4KV per
token), so its model-rate is an effective rate; the table also gives the rate
of the FLOPs m1 actually executes ("m1 exec"). Fractions are of the torch.mm
fp32 rate (2048^3) measured in the same run. SDPA is reported as time only.

Decode: one step at B = 1, H = 64, K = V = 128 against the PyTorch recurrence
(bench_lightning_decode.py's transformers formula and in-place formulation).

--long runs a forward at T = 1,048,576 (H = 2) in a child process and reports
how much its peak RSS grew over the process's RSS after `import m1ops`,
against the bytes of q, k, v and o. --memory does the same for m1
forward+backward at several T (tensors: q, k, v, o, grad_o, dq, dk, dv): a
growth that follows the tensors is memory linear in T.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import print_table, write_json

import m1ops

sys.path.insert(0, str(Path(__file__).parent))
from bench_lightning_decode import inplace_decode_step, transformers_decode_step  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MINIMAX_BLOCK = 256
STAT = {"median": statistics.median, "min": min}
stat = statistics.median  # set from --stat


def time_ms(fn, *, repeat: int = 5, warmup: int = 1, min_time_s: float = 0.0, slow_s: float = 3.0) -> float:
    """Wall time of fn() in ms over `repeat` runs (at least min_time_s), reduced with --stat.

    On a shared machine other processes steal whole scheduler slices from the
    2-thread runs; --stat min (best of N) is then the steadier figure. A
    warm-up call slower than slow_s (quadratic SDPA, the PyTorch loop at 64K)
    counts as a sample, and one more call is timed.
    """
    times: list[float] = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        if first > slow_s:
            times.append(first * 1e3)
            repeat = 2
            break
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return stat(times)


def mm_gflops(n: int = 2048) -> float:
    """torch.mm fp32 rate on n^3 (the ceiling), timed like everything else here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / (time_ms(lambda: torch.mm(a, b), repeat=7, warmup=2) * 1e-3) / 1e9


def blockwise_flops(T: int, H: int, K: int, V: int, block: int) -> float:
    """Forward FLOPs of the blockwise algorithm (full blocks, masked half included)."""
    total = 0
    for t0 in range(0, T, block):
        n = min(block, T - t0)
        total += 2 * n * n * (K + V) + 4 * n * K * V
    return float(H * total)


def pytorch_blockwise(q, k, v, slope, block=MINIMAX_BLOCK):
    """transformers' MiniMaxLightningAttention prefill loop (zero initial state).

    q, k: [B, T, H, K]; v: [B, T, H, V]; slope: [H]. Returns o [B, T, H, V], final state [B, H, K, V].
    """
    B, T, H, K = q.shape
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D] views
    s = slope.view(H, 1, 1)
    r = torch.arange(block, device=q.device) + 1
    query_decay = torch.exp(-s * r[:, None]).to(q.dtype)  # [H, block, 1]
    key_decay = torch.exp(-s * (block - r[:, None])).to(q.dtype)
    dist = s * (r[:, None] - r[None, :])[None]  # [H, block, block]
    diagonal_decay = torch.exp(torch.where(dist >= 0, -dist, float("-inf"))).to(q.dtype)[None]
    state = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype, device=q.device)
    outs = []
    for t0 in range(0, T, block):
        n = min(block, T - t0)
        cq, ck, cv = qh[:, :, t0 : t0 + n], kh[:, :, t0 : t0 + n], vh[:, :, t0 : t0 + n]
        intra = torch.matmul(torch.matmul(cq, ck.transpose(-1, -2)) * diagonal_decay[:, :, :n, :n], cv)
        inter = torch.matmul(cq * query_decay[:, :n], state)
        outs.append(intra + inter)
        block_decay = torch.exp(-s * n).to(q.dtype)
        state = state * block_decay + torch.matmul((ck * key_decay[:, -n:]).transpose(-1, -2), cv)
    return torch.cat(outs, dim=-2).transpose(1, 2), state


def sdpa(q, k, v):
    """Causal softmax attention on [B, T, H, D] tensors (as [B, H, T, D] views); returns [B, T, H, D]."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def fwd_bwd(fn, inputs, grad):
    """Forward then backward of fn(*inputs)[0] with upstream gradient `grad`."""

    def run():
        for x in inputs:
            x.grad = None
        out = fn(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    return run


def prefill_rows(args, mm_rate):
    rows = []
    H, K, V = args.heads, args.dim, args.dim
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for T in args.T:
            torch.manual_seed(T)
            q = torch.randn(1, T, H, K).to(dtype)
            k = (torch.randn(1, T, H, K) / K**0.5).to(dtype)
            v = torch.randn(1, T, H, V).to(dtype)
            slope = torch.logspace(-3, 0, H)
            do = torch.randn(1, T, H, V).to(dtype)
            model = blockwise_flops(T, H, K, V, MINIMAX_BLOCK)
            rep = dict(repeat=args.repeat, warmup=1)
            row = dict(dtype=dname, T=T, H=H, K=K, V=V, model_gflop=model / 1e9)

            row["m1_fwd_ms"] = time_ms(lambda: m1ops.lightning_attn(q, k, v, slope), **rep)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            m1_fb = fwd_bwd(lambda q, k, v: m1ops.lightning_attn(q, k, v, slope), leaves, do)
            row["m1_fwdbwd_ms"] = time_ms(m1_fb, **rep) if T <= args.backward_max_T else None
            exec_fwd = blockwise_flops(T, H, K, V, m1ops.lightning.DEFAULT_BLOCK_SIZE["cpu"])
            row["m1_fwd_frac"] = model / (row["m1_fwd_ms"] * 1e6) / mm_rate
            row["m1_exec_fwd_frac"] = exec_fwd / (row["m1_fwd_ms"] * 1e6) / mm_rate
            if row["m1_fwdbwd_ms"]:
                row["m1_fwdbwd_frac"] = 3 * model / (row["m1_fwdbwd_ms"] * 1e6) / mm_rate
            for bs in args.m1_block:
                row[f"m1_b{bs}_fwd_ms"] = time_ms(lambda: m1ops.lightning_attn(q, k, v, slope, block_size=bs), **rep)
                row[f"m1_b{bs}_fwd_frac"] = blockwise_flops(T, H, K, V, bs) / (row[f"m1_b{bs}_fwd_ms"] * 1e6) / mm_rate
                if row["m1_fwdbwd_ms"]:
                    fb = fwd_bwd(lambda q, k, v: m1ops.lightning_attn(q, k, v, slope, block_size=bs), leaves, do)
                    row[f"m1_b{bs}_fwdbwd_ms"] = time_ms(fb, **rep)
                    row[f"m1_b{bs}_fwdbwd_frac"] = (
                        3 * blockwise_flops(T, H, K, V, bs) / (row[f"m1_b{bs}_fwdbwd_ms"] * 1e6) / mm_rate
                    )

            if T <= args.pytorch_max_T[dname]:
                row["pt_fwd_ms"] = time_ms(lambda: pytorch_blockwise(q, k, v, slope), **rep)
                row["pt_fwd_frac"] = model / (row["pt_fwd_ms"] * 1e6) / mm_rate
                row["x_pt_fwd"] = row["pt_fwd_ms"] / row["m1_fwd_ms"]
                if row["m1_fwdbwd_ms"]:
                    pt_fb = fwd_bwd(lambda q, k, v: pytorch_blockwise(q, k, v, slope), leaves, do)
                    row["pt_fwdbwd_ms"] = time_ms(pt_fb, **rep)
                    row["pt_fwdbwd_frac"] = 3 * model / (row["pt_fwdbwd_ms"] * 1e6) / mm_rate
                    row["x_pt_fwdbwd"] = row["pt_fwdbwd_ms"] / row["m1_fwdbwd_ms"]
            if not args.no_sdpa and T <= args.sdpa_max_T:
                row["sdpa_fwd_ms"] = time_ms(lambda: sdpa(q, k, v), repeat=max(1, args.repeat // 2))
                row["x_sdpa_fwd"] = row["sdpa_fwd_ms"] / row["m1_fwd_ms"]
                if row["m1_fwdbwd_ms"] and T <= args.sdpa_backward_max_T:
                    row["sdpa_fwdbwd_ms"] = time_ms(fwd_bwd(sdpa, leaves, do), repeat=max(1, args.repeat // 2))
                    row["x_sdpa_fwdbwd"] = row["sdpa_fwdbwd_ms"] / row["m1_fwdbwd_ms"]
            rows.append(row)
            print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}), flush=True)
    return rows


def linearity(rows):
    """time(T = 4t) / (4 time(t)) for every pair of measured lengths 4x apart."""
    out = []
    by = {(r["dtype"], r["T"]): r for r in rows}
    for (dname, T), r in sorted(by.items()):
        big = by.get((dname, 4 * T))
        if big:
            item = dict(dtype=dname, T=T, T4=4 * T, fwd=big["m1_fwd_ms"] / (4 * r["m1_fwd_ms"]))
            if big.get("m1_fwdbwd_ms") and r.get("m1_fwdbwd_ms"):
                item["fwdbwd"] = big["m1_fwdbwd_ms"] / (4 * r["m1_fwdbwd_ms"])
            out.append(item)
    return out


def decode_rows(args):
    rows = []
    B, H, D = 1, 64, 128
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        q, k, v = (torch.randn(B, H, D).to(dtype) for _ in range(3))
        slope = torch.rand(H)
        state = torch.randn(B, H, D, D)
        ours = time_ms(lambda: m1ops.lightning_attn_decode(q, k, v, slope, state), repeat=50, min_time_s=0.5)
        hf = time_ms(lambda: transformers_decode_step(q, k, v, slope, state), repeat=20, min_time_s=0.5)
        inplace = time_ms(lambda: inplace_decode_step(q, k, v, slope, state), repeat=20, min_time_s=0.5)
        rows.append(dict(dtype=dname, B=B, H=H, K=D, V=D, m1_us=ours * 1e3, transformers_us=hf * 1e3,
                         inplace_us=inplace * 1e3, x_transformers=hf / ours, x_inplace=inplace / ours))
    return rows


CHILD = """
import sys, time, torch, m1ops


def peak_rss():  # VmHWM: this process's peak RSS (ru_maxrss would carry over the parent's from fork)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


T, H, D, backward = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
base = peak_rss()
q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
k /= D ** 0.5
slope = torch.logspace(-3, 0, H)
tensors = 3
if backward:
    for x in (q, k, v):
        x.requires_grad_()
t0 = time.perf_counter()
o, final = m1ops.lightning_attn(q, k, v, slope, output_final_state=True)
tensors += 1
if backward:
    o.backward(torch.ones_like(o))
    tensors += 4  # grad_o (ones), dq, dk, dv
seconds = time.perf_counter() - t0
print(seconds, base, peak_rss(), tensors * T * H * D * 4, bool(torch.isfinite(o).all()))
"""


def child_run(T, H, D, backward):
    out = subprocess.run([sys.executable, "-c", CHILD, str(T), str(H), str(D), "1" if backward else "0"],
                         capture_output=True, text=True, check=True)
    seconds, base, peak, tensor_bytes, finite = out.stdout.split()
    return dict(T=T, H=H, K=D, V=D, backward=backward, seconds=float(seconds), peak_rss_gb=int(peak) / 2**30,
                rss_before_gb=int(base) / 2**30, tensors_gb=int(tensor_bytes) / 2**30, finite=finite == "True")


def markdown(rows, lin, dec, long, mem, mm) -> str:
    """The README tables of one run."""
    pct = lambda x: "-" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    ms = lambda x: "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.1f}"  # noqa: E731
    ratio = lambda x: "-" if x is None else f"{x:.1f}x"  # noqa: E731
    out = [f"torch.mm fp32 (2048^3) in the same run: {mm[0]:.0f} GFLOP/s before, {mm[1]:.0f} after.", "",
           "| dtype | T | m1 fwd ms | fwd / mm | m1 fwd+bwd ms | f+b / mm | b256 fwd / mm | b256 f+b / mm "
           "| x PyTorch fwd | x PyTorch f+b | x SDPA fwd | x SDPA f+b |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dtype']} | {r['T']} | {ms(r['m1_fwd_ms'])} | {pct(r.get('m1_fwd_frac'))} "
                   f"| {ms(r.get('m1_fwdbwd_ms'))} | {pct(r.get('m1_fwdbwd_frac'))} | {pct(r.get('m1_b256_fwd_frac'))} "
                   f"| {pct(r.get('m1_b256_fwdbwd_frac'))} | {ratio(r.get('x_pt_fwd'))} | {ratio(r.get('x_pt_fwdbwd'))} "
                   f"| {ratio(r.get('x_sdpa_fwd'))} | {ratio(r.get('x_sdpa_fwdbwd'))} |")
    if lin:
        out += ["", "time(4T) / (4 time(T)): " + ", ".join(
            f"{x['dtype']} {x['T']}->{x['T4']}: fwd {x['fwd']:.2f}" + (f", f+b {x['fwdbwd']:.2f}" if "fwdbwd" in x else "")
            for x in lin)]
    if dec:
        out += ["", "| decode dtype | m1 us | transformers' formula us | in-place PyTorch us |", "|---|---|---|---|"]
        out += [f"| {d['dtype']} | {d['m1_us']:.0f} | {d['transformers_us']:.0f} ({d['x_transformers']:.1f}x) "
                f"| {d['inplace_us']:.0f} ({d['x_inplace']:.1f}x) |" for d in dec]
    if long or mem:
        out += ["", "| T | H | backward | seconds | tensors GiB | peak RSS growth GiB |", "|---|---|---|---|---|---|"]
        out += [f"| {r['T']} | {r['H']} | {r['backward']} | {r['seconds']:.1f} | {r['tensors_gb']:.2f} "
                f"| {r['growth_gb']:.2f} |" for r in long + mem]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="*", default=[1024, 4096, 16384, 32768, 65536],
                        help="sequence lengths of the prefill table (none: skip it)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128, help="K = V")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stat", choices=list(STAT), default="median", help="how repeated timings are reduced")
    parser.add_argument("--m1-block", type=int, nargs="*", default=[256], help="also time m1 at these block sizes")
    parser.add_argument("--backward-max-T", type=int, default=65536)
    parser.add_argument("--pytorch-max-T-fp32", type=int, default=65536)
    parser.add_argument("--pytorch-max-T-bf16", type=int, default=16384, help="bf16 matmul is slow on this CPU")
    parser.add_argument("--sdpa-max-T", type=int, default=32768, help="SDPA is quadratic: 64K takes minutes")
    parser.add_argument("--sdpa-backward-max-T", type=int, default=16384)
    parser.add_argument("--no-sdpa", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--long", action="store_true", help="forward at T = 1,048,576, H = 2, in a child process")
    parser.add_argument("--memory", action="store_true", help="peak RSS of forward+backward at several T")
    parser.add_argument("--name", default="lightning", help="JSON file name under bench/results/")
    parser.add_argument("--markdown", action="store_true", help="also print the README tables")
    args = parser.parse_args()
    args.pytorch_max_T = {"fp32": args.pytorch_max_T_fp32, "bf16": args.pytorch_max_T_bf16}
    global stat
    stat = STAT[args.stat]

    mm_before = mm_gflops()
    print(f"torch.mm fp32 2048^3: {mm_before:.1f} GFLOP/s; {torch.get_num_threads()} threads")
    rows = prefill_rows(args, mm_before) if args.T else []
    mm_after = mm_gflops()
    print(f"torch.mm fp32 after the prefill runs: {mm_after:.1f} GFLOP/s (before: {mm_before:.1f})")

    cols = [("dtype", "dtype", "s"), ("T", "T", "d"), ("m1_fwd_ms", "m1 fwd ms", ".1f"),
            ("m1_fwd_frac", "fwd/mm", ".0%"), ("m1_exec_fwd_frac", "m1 exec/mm", ".0%"),
            ("m1_fwdbwd_ms", "m1 f+b ms", ".1f"), ("m1_fwdbwd_frac", "f+b/mm", ".0%"),
            ("pt_fwd_ms", "pytorch fwd ms", ".1f"), ("x_pt_fwd", "x pytorch", ".1f"),
            ("pt_fwdbwd_ms", "pytorch f+b ms", ".1f"), ("x_pt_fwdbwd", "x pytorch f+b", ".1f"),
            ("sdpa_fwd_ms", "sdpa fwd ms", ".1f"), ("x_sdpa_fwd", "x sdpa", ".1f"),
            ("sdpa_fwdbwd_ms", "sdpa f+b ms", ".1f"), ("x_sdpa_fwdbwd", "x sdpa f+b", ".1f")]
    for bs in args.m1_block:
        cols += [(f"m1_b{bs}_fwd_frac", f"b{bs} fwd/mm", ".0%"), (f"m1_b{bs}_fwdbwd_frac", f"b{bs} f+b/mm", ".0%")]
    if rows:
        print_table(rows, cols)
    lin = linearity(rows)
    if lin:
        print("time(4T) / (4 time(T)):")
        print_table(lin, [("dtype", "dtype", "s"), ("T", "T", "d"), ("T4", "4T", "d"), ("fwd", "fwd", ".2f"),
                          ("fwdbwd", "f+b", ".2f")])
    dec = [] if args.no_decode else decode_rows(args)
    if dec:
        print("decode step, B=1 H=64 K=V=128:")
        print_table(dec, [("dtype", "dtype", "s"), ("m1_us", "m1 us", ".1f"), ("transformers_us", "transformers us", ".1f"),
                          ("inplace_us", "in-place us", ".1f"), ("x_transformers", "x transformers", ".1f"),
                          ("x_inplace", "x in-place", ".1f")])
    long = [child_run(1 << 20, 2, 128, False)] if args.long else []
    mem = [child_run(T, 8, 128, True) for T in (4096, 16384, 65536)] if args.memory else []
    for r in long + mem:
        r["growth_gb"] = r["peak_rss_gb"] - r["rss_before_gb"]
    if long or mem:
        print("peak RSS (child processes):")
        print_table(long + mem, [("T", "T", "d"), ("H", "H", "d"), ("backward", "f+b", ""), ("seconds", "s", ".2f"),
                                 ("tensors_gb", "tensors GiB", ".2f"), ("growth_gb", "peak RSS growth GiB", ".2f"),
                                 ("finite", "finite", "")])
    if args.markdown:
        print(markdown(rows, lin, dec, long, mem, (mm_before, mm_after)))
    write_json(args.name, {"mm_gflops": [mm_before, mm_after], "flop_model_block": MINIMAX_BLOCK,
                           "m1_default_block": m1ops.lightning.DEFAULT_BLOCK_SIZE["cpu"], "args": vars(args),
                           "prefill": rows, "linearity": lin, "decode": dec, "long": long, "memory": mem})


if __name__ == "__main__":
    main()
