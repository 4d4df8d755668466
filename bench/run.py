"""Every kernel benchmark (issues 3, 4, 5) in one command, and the README's summary table.

    python bench/run.py                 # full shapes (long: lightning to T = 64K, logits at V = 200064)
    python bench/run.py --quick         # reduced shapes, a few minutes: bench/results/quick/
    python bench/run.py --smoke         # toy shapes, seconds: checks the plumbing (the tests run it)
    python bench/run.py --summary-only  # rebuild summary.md (and the README block) from existing JSON
    python bench/run.py --dry-run       # print the commands only

Runs bench_lightning.py, bench_lightning_decode.py, bench_moe.py and
bench_logits.py one after another, each in its own process with its usual JSON
output (M1_BENCH_RESULTS redirects it for --quick and --smoke), then reads
those JSON files back into one markdown table:

    op | shape | dtype | ours ms | baselines ms | speedup | GFLOP/s | of torch.mm

"of torch.mm" is the achieved rate over the fp32 torch.mm rate each benchmark
measured in its own run (for fused MoE: a dense mm with the same FLOPs at the
same shape). Every number in a row comes from one process, so the ratios hold
on a loaded machine even where the absolute times do not. The table goes to
<results>/summary.md; a full run (or --summary-only on the full results, or
any run with --readme) also refreshes the README between the markers
<!-- bench:summary --> and <!-- /bench:summary -->.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- bench:summary -->", "<!-- /bench:summary -->"

# (script, json name, extra arguments per mode). The full mode is each benchmark's own default.
BENCHES = [
    ("bench_lightning.py", "lightning", {
        "full": ["--long"],
        "quick": ["--T", "1024", "4096", "--repeat", "2", "--m1-block", "--pytorch-max-T-bf16", "1024",
                  "--sdpa-max-T", "4096", "--sdpa-backward-max-T", "4096", "--no-decode"],
        "smoke": ["--T", "256", "--dtypes", "fp32", "--repeat", "1", "--m1-block", "--sdpa-max-T", "256",
                  "--sdpa-backward-max-T", "256", "--no-decode"],
    }),
    ("bench_lightning_decode.py", "lightning_decode", {
        "full": [],
        "quick": ["--batch", "1"],
        "smoke": ["--batch", "1", "--heads", "2", "--dim", "16"],
    }),
    ("bench_moe.py", "moe", {
        "full": [],
        "quick": ["--tokens", "16", "512", "--budget", "1"],
        "smoke": ["--tokens", "16", "--dtypes", "float32", "--budget", "0.05", "--shape", "64", "96", "4", "2"],
    }),
    ("bench_logits.py", "logits", {
        "full": [],
        "quick": ["--tokens", "1024", "--vocab", "32768", "--repeat", "2", "--sweep-std"],
        "smoke": ["--tokens", "64", "--dim", "64", "--vocab", "512", "--repeat", "1", "--sweep-std",
                  "--impls", "m1", "torch fp32"],
    }),
]


def results_dir(mode: str) -> Path:
    return BENCH / "results" if mode == "full" else BENCH / "results" / mode


# ------------------------------------------------------------------ summary rows
# One function per benchmark's JSON: rows of (op, shape, dtype, ours_ms, baselines,
# speedup, gflops, frac_mm); baselines and speedup are strings naming each baseline.


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.3f}"


def lightning_rows(data: dict) -> list[dict]:
    mm = sum(data["mm_gflops"]) / len(data["mm_gflops"])
    rows = []
    for r in data["prefill"]:
        shape = f"B=1 T={r['T']} H={r['H']} K=V={r['K']}"
        flops = r["model_gflop"] * 1e9  # blockwise algorithm at block 256 (see bench_lightning.py)
        for mode, ms_key, pt, sd, mult, frac in (("fwd", "m1_fwd_ms", "pt_fwd_ms", "sdpa_fwd_ms", 1, "m1_fwd_frac"),
                                                 ("fwd+bwd", "m1_fwdbwd_ms", "pt_fwdbwd_ms", "sdpa_fwdbwd_ms", 3,
                                                  "m1_fwdbwd_frac")):
            ms = r.get(ms_key)
            if not ms:
                continue
            base = {"PyTorch blockwise": r.get(pt), "SDPA (softmax)": r.get(sd)}
            rows.append(dict(op=f"lightning_attn {mode}", shape=shape, dtype=r["dtype"], ours_ms=ms, baselines=base,
                             gflops=mult * flops / (ms * 1e6), frac_mm=r.get(frac), mm=mm))
    return rows


def lightning_decode_rows(data: dict) -> list[dict]:
    rows = []
    for r in data["rows"]:
        flops = 4 * r["B"] * r["H"] * r["K"] * r["V"]  # m1ops.flops.lightning_decode_flops
        ms = r["m1_us"] / 1e3
        rows.append(dict(op="lightning_attn_decode", shape=f"B={r['B']} H={r['H']} K=V={r['K']}", dtype=r["dtype"],
                         ours_ms=ms, baselines={"transformers' step": r["transformers_us"] / 1e3,
                                                "in-place PyTorch": r["inplace_us"] / 1e3},
                         gflops=flops / (ms * 1e6), frac_mm=None, mm=None))
    return rows


def moe_rows(data: dict) -> list[dict]:
    s = data["shape"]
    rows = []
    for r in data["rows"]:
        shape = f"T={r['T']} D={s['D']} F={s['F']} E={s['E']} k={s['k']}"
        rows.append(dict(op="fused_moe fwd", shape=shape, dtype=r["dtype"], ours_ms=r["m1_fwd_ms"],
                         baselines={"per-expert loop": r["loop_fwd_ms"]}, gflops=r["m1_fwd_gflops"],
                         frac_mm=r["fwd_vs_dense"], mm=r["dense_mm_gflops"]))
        rows.append(dict(op="fused_moe fwd+bwd", shape=shape, dtype=r["dtype"], ours_ms=r["m1_fwd_bwd_ms"],
                         baselines={"per-expert loop": r["loop_fwd_bwd_ms"]}, gflops=r["m1_fwd_bwd_gflops"],
                         frac_mm=r["fwd_bwd_vs_dense"], mm=r["dense_mm_gflops"]))
    return rows


def logits_rows(data: dict) -> list[dict]:
    mm = sum(data["mm_gflops"]) / len(data["mm_gflops"])
    timed = [r for r in data["rows"] if "ms" in r]
    rows = []
    for r in timed:
        if not r["impl"].startswith("m1"):
            continue
        base = {f"unfused {t['impl'].removeprefix('torch ')}": t["ms"] for t in timed
                if t["V"] == r["V"] and t["mode"] == r["mode"] and t["impl"].startswith("torch")}
        rows.append(dict(op=f"fp32_logprobs {r['mode']}", shape=f"N={data['N']} D={data['D']} V={r['V']}",
                         dtype="bf16 in" if "bf16" in r["impl"] else "fp32", ours_ms=r["ms"], baselines=base,
                         gflops=r["gflops"], frac_mm=r["pct_mm"] / 100, mm=mm))
    return rows


READERS = {"lightning": lightning_rows, "lightning_decode": lightning_decode_rows, "moe": moe_rows,
           "logits": logits_rows}


def summary_markdown(results: Path, manifest: dict | None, mode: str = "full") -> str:
    rows, sources = [], []
    for script, name, _modes in BENCHES:
        path = results / f"{name}.json"
        if not path.exists():
            sources.append(f"{name}: no results yet")
            continue
        data = json.loads(path.read_text())
        rows += READERS[name](data)
        run = (manifest or {}).get(name)
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(path.stat().st_mtime))
        load = f", load average {run['load_before']:.1f} -> {run['load_after']:.1f}" if run else ""
        sources.append(f"{name}: `{run['command'] if run else 'python bench/' + script}` ({when} UTC{load})")
    out = [] if mode == "full" else [
        f"Shapes of `python bench/run.py --{mode}` (the full shapes: `python bench/run.py`).", ""]
    out += ["| op | shape | dtype | ours ms | baselines ms | speedup | GFLOP/s | of torch.mm |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = {k: v for k, v in r["baselines"].items() if v}
        bstr = "; ".join(f"{k} {_fmt_ms(v)}" for k, v in base.items()) or "-"
        sstr = "; ".join(f"{v / r['ours_ms']:.1f}x" for v in base.values()) or "-"
        frac = "-" if r["frac_mm"] is None else f"{100 * r['frac_mm']:.0f}%"
        out.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {_fmt_ms(r['ours_ms'])} | {bstr} | {sstr} "
                   f"| {r['gflops']:.1f} | {frac} |")
    notes = [
        "", "Speedup: each baseline's time over ours, in the order listed. lightning_attn GFLOP/s count the "
        "blockwise algorithm at block 256 (bench_lightning.py); fused_moe's torch.mm column is a dense mm of "
        "the same FLOPs; lightning_attn_decode is memory-bound (no mm fraction). Sources:",
        *[f"- {s}" for s in sources],
    ]
    return "\n".join(out + notes) + "\n"


def refresh_readme(summary: str, readme: Path = README) -> bool:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{summary}{END}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick", help="reduced shapes")
    size.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="toy shapes (plumbing)")
    parser.set_defaults(mode="full")
    parser.add_argument("--only", nargs="+", choices=[n for _, n, _ in BENCHES], help="run these benchmarks only")
    parser.add_argument("--results", type=Path, help="results folder (default bench/results[/quick|/smoke])")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; rebuild the summary")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    parser.add_argument("--readme", action="store_true",
                        help="refresh README.md from --quick/--smoke/--results too (by default only full results)")
    args = parser.parse_args(argv)
    results = args.results or results_dir(args.mode)
    manifest_path = results / "run.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}

    for script, name, modes in BENCHES:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(BENCH / script), *modes[args.mode]]
        shown = "python bench/" + script + "".join(" " + shlex.quote(a) for a in modes[args.mode])
        if args.dry_run or args.summary_only:
            if args.dry_run:
                print(shown)
            continue
        print(f"== {shown}", flush=True)
        load_before, t0 = os.getloadavg()[0], time.perf_counter()
        env = {**os.environ, "M1_BENCH_RESULTS": str(results)}
        subprocess.run(cmd, cwd=BENCH, env=env, check=True)
        manifest[name] = dict(command=shown, seconds=time.perf_counter() - t0, load_before=load_before,
                              load_after=os.getloadavg()[0])
        results.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    if args.dry_run:
        return 0

    summary = summary_markdown(results, manifest, args.mode)
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {results / 'summary.md'}")
    if (results == results_dir("full") or args.readme) and not args.no_readme:
        print("refreshed README.md" if refresh_readme(summary) else f"README.md has no {BEGIN} block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
