"""The README's main job across seeds: SFT warm start + CISPO on addition, wall time and held-out accuracy.

    python bench/bench_rl_demo.py --seeds 0,1,2 [--algo cispo] [--jobs 1] [-- more m1model.train options]

Runs `python -m m1model.train --task addition --algo ALGO --seed S --out DIR` once per seed, one
after the other (each alone on the machine, as a user would run it; --jobs N runs N seeds at once,
which only stretches the wall times: the accuracies depend on the seed only), and reports per seed the
wall time of the whole command (interpreter start, SFT, RL, evaluations, checkpoints), the
held-out greedy accuracy after SFT and at the end, and the gain. Also the machine's load average
during the run: other work on the cores stretches the times (not the accuracies, which depend on
the seed only). Writes bench/results/rl_demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import print_table, write_json

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, algo: str, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "m1model.train", "--task", "addition", "--algo", algo, "--seed", str(seed),
           "--out", str(out), "--no-progress", *extra]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_accuracy"]) for r in records if r.get("eval_accuracy") is not None]
    return {
        "seed": seed,
        "command": shlex.join(["python", *cmd[1:]]),
        "wall_s": wall,
        "sft_accuracy": evals[0][1],
        "final_accuracy": evals[-1][1],
        "gain_points": 100 * (evals[-1][1] - evals[0][1]),
        "steps": records[-1]["step"],
        "sft_s": records[0].get("sft_s"),
        "sft_steps_run": records[0].get("sft_steps_run"),
        "sft_loss": records[0].get("sft_loss"),
        "load_avg_1min": (load0 + os.getloadavg()[0]) / 2,
        "eval_curve": evals,
        "summary": [line for line in proc.stdout.splitlines() if "held-out accuracy" in line],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--algo", default="cispo")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at the same time")
    p.add_argument("--name", default="rl_demo", help="results file: bench/results/NAME.json")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="more m1model.train options, after --")
    args = p.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="m1-rl-demo-") as tmp, ThreadPoolExecutor(args.jobs) as pool:
        def one(seed: int) -> dict:
            r = run_seed(seed, args.algo, extra, Path(tmp) / f"seed{seed}")
            print(f"seed {seed}: {100 * r['sft_accuracy']:.1f}% -> {100 * r['final_accuracy']:.1f}% "
                  f"({r['gain_points']:+.1f} points) in {r['wall_s']:.0f} s (load {r['load_avg_1min']:.1f})",
                  flush=True)
            return r

        rows = list(pool.map(one, seeds))
    print_table(rows, [("seed", "seed", "d"), ("wall_s", "wall s", ".0f"), ("sft_s", "SFT s", ".0f"),
                       ("sft_steps_run", "SFT steps", "d"), ("sft_accuracy", "SFT acc", ".3f"),
                       ("final_accuracy", "final acc", ".3f"), ("gain_points", "gain (points)", "+.1f"),
                       ("load_avg_1min", "load avg", ".1f")])
    write_json(args.name, {"algo": args.algo, "extra_args": extra, "jobs": args.jobs, "cpus": os.cpu_count(),
                           "runs": rows})


if __name__ == "__main__":
    main()
