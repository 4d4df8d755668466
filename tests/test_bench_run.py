"""bench/run.py plumbing: every kernel benchmark runs at toy shapes, writes its JSON, and
the summary table has a row per op; the README block is replaced in place. No timing
is asserted (the toy runs measure nothing meaningful)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, load_bench


@pytest.fixture(scope="module")
def run_module():
    return load_bench("run")


@pytest.mark.parametrize("mode", ["--quick", "--smoke", None])
def test_dry_run_lists_every_benchmark(mode):
    args = [sys.executable, str(ROOT / "bench" / "run.py"), "--dry-run"] + ([mode] if mode else [])
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()
    scripts = [line.split()[1] for line in out]
    assert scripts == ["bench/bench_lightning.py", "bench/bench_lightning_decode.py", "bench/bench_moe.py",
                       "bench/bench_logits.py"]
    assert all((ROOT / s).exists() for s in scripts)


def test_smoke_run_writes_a_summary_row_per_op(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--results", str(tmp_path)],
                   check=True, capture_output=True, text=True, timeout=600)
    for name in ("lightning", "lightning_decode", "moe", "logits", "run"):
        assert (tmp_path / f"{name}.json").exists(), name
    summary = (tmp_path / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| op ")]
    ops = {row.split(" | ")[0].removeprefix("| ") for row in rows}
    assert ops == {"lightning_attn fwd", "lightning_attn fwd+bwd", "lightning_attn_decode", "fused_moe fwd",
                   "fused_moe fwd+bwd", "fp32_logprobs fwd", "fp32_logprobs fwd+bwd"}
    for row in rows:
        cells = row.strip("|").split("|")
        assert len(cells) == 8
        assert "nan" not in row.lower()
        float(cells[3].strip())  # ours ms
        float(cells[6].strip())  # GFLOP/s
    assert "load average" in summary  # the manifest of the run is quoted


def test_readme_block_is_replaced_in_place(run_module, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{run_module.BEGIN}\nold table\n{run_module.END}\nafter\n")
    assert run_module.refresh_readme("| new |\n", readme)
    assert readme.read_text() == f"# x\n\nbefore\n{run_module.BEGIN}\n| new |\n{run_module.END}\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not run_module.refresh_readme("| new |\n", plain)
    assert plain.read_text() == "no markers\n"
