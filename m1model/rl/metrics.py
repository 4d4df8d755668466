"""Training metrics: a resumable metrics.jsonl, the rollout/training probability correlation, plots.

metrics.jsonl holds one JSON object per line, one line per step, each with a
"step" key; a line is written, flushed and fsync-ed before the writer returns.
Non-finite floats are written as null (strict JSON). After a crash the file may
end in a torn line; `read_metrics` ignores it, and `MetricsWriter(path,
resume_step=S)` rewrites the file (atomically) without the torn line and
without the steps after S -- those are recomputed after resuming from the
step-S checkpoint -- so a resumed run's file equals an uninterrupted run's.

Plot from the command line (one run or several to compare):

    python -m m1model.rl.metrics RUN_DIR_OR_JSONL [MORE ...] --out reward.png [--keys reward_mean,accuracy]
    python -m m1model.rl.metrics --compare runs/cispo,runs/grpo,runs/dapo --out compare.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from m1model.rl.checkpoint import atomic_write_text

DEFAULT_PLOT_KEYS = ("reward_mean", "accuracy")


def _clean(value):
    """JSON-ready value: tensors and numpy scalars to Python numbers, non-finite floats to None."""
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        value = value.tolist()   # a 0-dim tensor or numpy scalar becomes a Python number
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _parse_lines(text: str) -> tuple[list[dict], int]:
    """Records of complete lines, and the length of the valid prefix of `text`."""
    records, good = [], 0
    pos = 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        if not line.endswith("\n"):
            break                                      # torn final line
        try:
            rec = json.loads(line)
        except ValueError:
            break
        if not isinstance(rec, dict) or "step" not in rec:
            break
        records.append(rec)
        good = pos
    return records, good


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl (or of RUN_DIR/metrics.jsonl), ignoring a torn last line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return _parse_lines(path.read_text())[0]


class MetricsWriter:
    """Appends one JSON line per step to a metrics.jsonl.

    resume_step=None starts a new file (an existing one is replaced).
    resume_step=S keeps the existing records with step <= S and drops later
    ones and any torn line, then appends.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            records, _ = _parse_lines(self.path.read_text()) if self.path.exists() else ([], 0)
            kept = [r for r in records if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        self._file = open(self.path, "a")

    def write(self, step: int, metrics: Mapping | None = None, **more) -> dict:
        """Writes {"step": step, **metrics, **more}; returns the record as written."""
        record = {"step": int(step), **_clean(dict(metrics or {})), **_clean(more)}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        return record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pearson(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Pearson correlation of x and y (over `mask` where given) in float64; NaN if either is constant
    or there are fewer than 2 points."""
    if x.shape != y.shape or (mask is not None and mask.shape != x.shape):
        raise ValueError(f"pearson: x, y (and mask) must have one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
                         + ("" if mask is None else f", {tuple(mask.shape)}"))
    x, y = x.detach().double(), y.detach().double()
    if mask is not None:
        x, y = x[mask], y[mask]
    x, y = x.reshape(-1), y.reshape(-1)
    if x.numel() < 2:
        return math.nan
    xc, yc = x - x.mean(), y - y.mean()
    denom = (xc.square().sum() * yc.square().sum()).sqrt()
    return (xc * yc).sum().div(denom).item() if denom > 0 else math.nan


def prob_corr(rollout_logp: torch.Tensor, train_logp: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Pearson correlation of token PROBABILITIES exp(logp) from the rollout engine and the training
    forward -- the paper's train/inference agreement check (0.987 with a bf16 head, 0.997 fp32)."""
    return pearson(rollout_logp.detach().double().exp(), train_logp.detach().double().exp(), mask)


def plot_metrics(
    runs: Mapping[str, Sequence[Mapping]] | Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    keys: Iterable[str] = DEFAULT_PLOT_KEYS,
    title: str | None = None,
):
    """One panel per metric key against step, one line per run; writes a PNG to `out`.

    runs: label -> records (list of dicts) or label -> metrics.jsonl / run directory.
    Records without a key (or with null) are skipped for that key. Returns the
    matplotlib Figure (already saved).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(keys)
    if not keys:
        raise ValueError("plot_metrics: keys is empty")
    loaded = {label: read_metrics(r) if isinstance(r, (str, os.PathLike)) else list(r) for label, r in runs.items()}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, records in loaded.items():
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=label, marker="." if len(pts) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m1model.rl.metrics", description="Plot metrics.jsonl files.")
    parser.add_argument("runs", nargs="*", help="run directories or metrics.jsonl files; several are compared")
    parser.add_argument("--compare", default="", help="more runs, comma-separated (same as listing them)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--keys", default=",".join(DEFAULT_PLOT_KEYS), help="comma-separated metric keys")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    paths = [Path(r) for r in [*args.runs, *filter(None, args.compare.split(","))]]
    if not paths:
        parser.error("give at least one run directory or metrics.jsonl")
    labels = [p.parent.name if p.name == "metrics.jsonl" else p.name for p in paths]
    if len(set(labels)) < len(labels):   # same directory names: label by the full path
        labels = [str(p) for p in paths]
    runs = dict(zip(labels, paths))
    plot_metrics(runs, args.out, keys=[k for k in args.keys.split(",") if k], title=args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
