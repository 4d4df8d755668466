"""bench/bench_model.py and bench/profile_model.py run end to end on the tiny preset (the README's
m1model numbers come from them): every batch size writes its JSON with both phases, the two
implementations agree before anything is timed, and the profile prints the decode split. No
timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

pytest.importorskip("transformers", reason="the benchmarks compare against transformers' MiniMax")


def run(script: str, *args: str, results=None) -> str:
    env = dict(os.environ, M1_BENCH_RESULTS=str(results)) if results else None
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], check=True, capture_output=True,
                         text=True, timeout=600, env=env)
    return out.stdout


def test_bench_model_writes_a_table_per_batch_size(tmp_path):
    out = run("bench_model.py", "--preset", "tiny", "--tokens", "40", "--decode-steps", "3", "--repeat", "1",
              "--batch", "1", "3", "--threads", "1", results=tmp_path)
    for B in (1, 3):
        payload = json.loads((tmp_path / f"model_tiny_float32_B{B}_T40_threads1.json").read_text())
        assert payload["batch"] == B and payload["tokens"] == 40
        assert payload["logits_rel_diff"] < 1e-4  # fp32 parity with transformers, as the model tests require
        assert [r["phase"] for r in payload["rows"]] == ["prefill", "decode @40"]
        assert all(r["ours_tps"] > 0 and r["hf_tps"] > 0 and r["lo"] <= r["speedup"] <= r["hi"] for r in payload["rows"])
        assert len(payload["decode_step_s"]["ours"]) == len(payload["decode_step_s"]["theirs"]) == 3
        assert len(payload["memory_read_gbs"]) == 2 and min(payload["memory_read_gbs"]) > 0
    assert out.count("speedup = transformers time / m1model time") == 2


def test_profile_model_prints_parts_and_the_decode_split():
    out = run("profile_model.py", "--preset", "tiny", "--tokens", "40", "--steps", "2", "--rows", "3")
    for tag in ("ours", "theirs"):
        assert f"== {tag} prefill 40 tokens" in out and f"== {tag} decode step at 40" in out
        assert f"{tag}.mlp" in out and f"{tag}.self_attn" in out
    assert "decode step" in out and "everything else" in out
