"""metrics.jsonl writer, Pearson correlation and plots (m1model.rl.metrics)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from m1model.rl.metrics import MetricsWriter, main, pearson, plot_metrics, prob_corr, read_metrics


def test_writer_appends_flushes_and_cleans_values(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.write(0, {"reward_mean": torch.tensor(0.25), "clip_frac": np.float32(0.5)}, accuracy=0.1)
        # Visible on disk before close (flushed), one object per line.
        assert json.loads(path.read_text().splitlines()[0]) == {"step": 0, "reward_mean": 0.25, "clip_frac": 0.5,
                                                                "accuracy": 0.1}
        rec = w.write(1, {"prob_corr": float("nan"), "hist": [1.0, float("inf")], "n": torch.tensor([1, 2])})
    assert rec == {"step": 1, "prob_corr": None, "hist": [1.0, None], "n": [1, 2]}
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1]


def test_resume_drops_later_steps_and_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    uninterrupted = tmp_path / "ref.jsonl"
    with MetricsWriter(uninterrupted) as ref:
        for s in range(6):
            ref.write(s, reward_mean=s / 10)
    with MetricsWriter(path) as w:
        for s in range(5):
            w.write(s, reward_mean=s / 10)
    with open(path, "a") as f:       # a crash in the middle of writing step 5
        f.write('{"step": 5, "reward_m')
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4]
    # The last checkpoint was at step 3: steps 4.. are recomputed after resuming.
    with MetricsWriter(path, resume_step=3) as w:
        for s in (4, 5):
            w.write(s, reward_mean=s / 10)
    assert path.read_text() == uninterrupted.read_text()
    # A fresh writer replaces an old file.
    MetricsWriter(path).close()
    assert path.read_text() == ""
    # Resuming with no file yet starts one.
    with MetricsWriter(tmp_path / "new.jsonl", resume_step=10) as w:
        w.write(11, x=1)
    assert read_metrics(tmp_path / "new.jsonl") == [{"step": 11, "x": 1}]


def test_pearson():
    x = torch.randn(1000, dtype=torch.float64)
    assert pearson(x, 3 * x + 2) == pytest.approx(1.0, abs=1e-12)
    assert pearson(x, -x) == pytest.approx(-1.0, abs=1e-12)
    # Against numpy's corrcoef on independent-ish data.
    y = 0.5 * x + torch.randn(1000, dtype=torch.float64)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x.numpy(), y.numpy())[0, 1], rel=1e-12)
    # The mask selects tokens: garbage outside it does not matter.
    mask = torch.rand(1000) > 0.3
    y_bad = y.clone()
    y_bad[~mask] = float("nan")
    assert pearson(x, y_bad, mask) == pytest.approx(np.corrcoef(x[mask].numpy(), y[mask].numpy())[0, 1], rel=1e-12)
    assert math.isnan(pearson(x, torch.ones_like(x)))
    assert math.isnan(pearson(x[:1], x[:1]))
    with pytest.raises(ValueError, match="one shape"):
        pearson(x, x[:10])


def test_prob_corr_compares_probabilities():
    logp = torch.log(torch.rand(4, 50, dtype=torch.float64) * 0.98 + 0.01)
    noisy = logp + 0.05 * torch.randn_like(logp)
    mask = torch.ones(4, 50, dtype=torch.bool)
    expected = np.corrcoef(logp.exp().flatten().numpy(), noisy.exp().flatten().numpy())[0, 1]
    assert prob_corr(logp, noisy, mask) == pytest.approx(expected, rel=1e-12)
    assert prob_corr(logp, logp, mask) == pytest.approx(1.0, abs=1e-12)


def test_plot_one_and_several_runs(tmp_path):
    runs = {}
    for algo, slope in (("cispo", 0.02), ("grpo", 0.01)):
        with MetricsWriter(tmp_path / algo / "metrics.jsonl") as w:
            for s in range(40):
                w.write(s, reward_mean=slope * s, accuracy=(slope * s if s % 5 == 0 else None))
        runs[algo] = tmp_path / algo
    fig = plot_metrics(runs, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reward_ax, acc_ax = fig.axes[:2]
    assert [line.get_label() for line in reward_ax.lines] == ["cispo", "grpo"]
    assert list(reward_ax.lines[1].get_xdata()) == list(range(40))
    assert list(reward_ax.lines[1].get_ydata()) == pytest.approx([0.01 * s for s in range(40)])
    assert list(acc_ax.lines[0].get_xdata()) == list(range(0, 40, 5))     # nulls skipped
    # From records directly, one run, custom keys.
    fig = plot_metrics({"run": read_metrics(tmp_path / "cispo")}, tmp_path / "one.png", keys=["reward_mean"])
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 1


def test_cli(tmp_path, capsys):
    for name in ("a", "b"):
        with MetricsWriter(tmp_path / name / "metrics.jsonl") as w:
            w.write(0, reward_mean=0.0, accuracy=0.0)
            w.write(1, reward_mean=1.0, accuracy=0.5)
    main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out", str(tmp_path / "p.png")])
    assert "wrote" in capsys.readouterr().out and (tmp_path / "p.png").stat().st_size > 1000
    main(["--compare", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(tmp_path / "q.png"), "--keys", "accuracy"])
    assert (tmp_path / "q.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a")])                     # --out is required
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "r.png")])        # no run
