"""Command line RL training of a tiny M1 (see m1model.rl.trainer for what a step does).

    python -m m1model.train --task addition --algo cispo --steps 100 --seed 0 --out runs/cispo [--resume]
    python -m m1model.train --compare cispo,grpo,dapo --steps 100 --out runs/compare     # same seeds, one plot
    torchrun --nproc_per_node 2 -m m1model.train ...                                     # data parallel (gloo)

Writes DIR/metrics.jsonl (one JSON object per step; step 0 is the SFT warm
start), DIR/checkpoints/ (atomic, safetensors + JSON) and DIR/reward.png, and
prints the held-out accuracy before and after RL. Every TrainConfig field is
an option (`--help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from m1model.rl.metrics import plot_metrics, read_metrics
from m1model.rl.tasks import TASKS
from m1model.rl.trainer import ALGOS, OLD_LOGP, RunDirError, TrainConfig, TrainResult, train

PLOT_KEYS = ("reward_mean", "accuracy", "eval_accuracy")
_TYPES = {"int": int, "float": float, "str": str, "int | None": int, "float | None": float}
_CHOICES = {"task": sorted(TASKS), "algo": ALGOS, "old_logp": OLD_LOGP}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m m1model.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=_TYPES[f.type], default=f.default, choices=_CHOICES.get(f.name),
                           help=f.metadata["help"])
    p.add_argument("--compare", default=None, metavar="ALGOS",
                   help="comma-separated algorithms (e.g. cispo,grpo,dapo) run one after the other with the same "
                        "seed, each into OUT/<algo>, plotted together in OUT/compare.png")
    return p


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary(cfg: TrainConfig, result: TrainResult) -> str:
    before, after = result.sft_eval["eval_accuracy"], result.final_eval["eval_accuracy"]
    minutes, seconds = divmod(round(result.elapsed_s), 60)
    return (f"{cfg.algo}: held-out accuracy ({cfg.eval_problems} {cfg.task} problems of the eval split, greedy) "
            f"{_percent(before)} after SFT -> {_percent(after)} after {result.steps} RL steps "
            f"({100 * (after - before):+.1f} points); {minutes}m{seconds:02d}s")


def run_one(cfg: TrainConfig) -> TrainResult:
    result = train(cfg)
    if _is_main():
        plot_metrics({cfg.algo: read_metrics(result.out)}, result.out / "reward.png", keys=PLOT_KEYS,
                     title=f"{cfg.algo} on {cfg.task}, seed {cfg.seed}")
        print(summary(cfg, result), flush=True)
        print(f"wrote {result.out / 'metrics.jsonl'}, {result.out / 'reward.png'}, {result.out / 'checkpoints'}/",
              flush=True)
    return result


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    p = parser()
    args = vars(p.parse_args(argv))
    compare = args.pop("compare")
    algos = [a for a in (compare or args["algo"]).split(",") if a]
    if not algos or any(a not in ALGOS for a in algos):
        p.error(f"--compare: give algorithms from {ALGOS}, comma-separated; got {compare!r}")
    out = Path(args["out"])
    try:
        configs = [TrainConfig(**args)] if not compare else [
            TrainConfig(**{**args, "algo": a, "out": str(out / a)}) for a in algos]
    except ValueError as e:
        p.error(str(e))
    try:
        for cfg in configs:
            run_one(cfg)
        if compare and _is_main():
            plot_metrics({a: read_metrics(out / a) for a in algos}, out / "compare.png", keys=PLOT_KEYS,
                         title=f"{args['task']}, seed {args['seed']}")
            print(f"wrote {out / 'compare.png'}", flush=True)
        if _is_main():
            print(f"total wall time {time.perf_counter() - t0:.0f} s", flush=True)
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from m1model.rl import parallel

        parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
