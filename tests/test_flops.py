"""bench/flops.py: the analytic FLOPs model against the published parameter counts and
against an explicit per-token sum."""

from __future__ import annotations

import pytest
from helpers import load_bench


@pytest.fixture(scope="module")
def flops():
    return load_bench("flops")


def test_configs_reproduce_published_parameter_counts(flops):
    counts = flops.all_counts()
    assert flops.check_params(counts, tol=0.02) == []
    m1 = counts["MiniMax-M1"]
    assert m1.active_params == pytest.approx(45.9e9, rel=0.005)  # paper: 45.9B active
    assert m1.total_params == pytest.approx(456e9, rel=0.005)


def test_cumulative_is_the_sum_of_per_token_costs(flops):
    for c in flops.all_counts().values():
        for n in (1, 7, 1000):
            assert c.cumulative(n) == pytest.approx(sum(c.per_token(t) for t in range(1, n + 1)), rel=1e-12)


def test_split_adds_up_and_lightning_is_flat(flops):
    counts = flops.all_counts()
    for c in counts.values():
        for t in (1, 65_536):
            assert sum(c.split(t).values()) == pytest.approx(c.per_token(t), rel=1e-12)
    m1, r1 = counts["MiniMax-M1"], counts["DeepSeek-R1 (MLA expanded)"]
    # Only M1's 10 softmax layers grow with context: 10 * 2 * 64 * (128 + 128) per token.
    assert m1.attn_ctx_coeff == 10 * 2 * 64 * 256
    assert r1.attn_ctx_coeff == 61 * 2 * 128 * (192 + 128)
    # M1's per-token cost grows ~15x slower with context than R1's.
    assert r1.attn_ctx_coeff / m1.attn_ctx_coeff > 15


def test_ratio_falls_with_length_and_bracket_the_paper(flops):
    rows = flops.ratio_table(flops.all_counts())
    ratios = [r["M1/R1 expanded"] for r in rows]
    assert all(a > b for a, b in zip(ratios, ratios[1:]))
    for r in rows:
        if r["paper M1/R1"]:
            # Absorbed MLA is the cheapest count of R1 and expanded the dearest: the paper lies between.
            assert r["M1/R1 absorbed"] < r["paper M1/R1"] < r["M1/R1 expanded"]


def test_main_writes_json_and_png(flops, tmp_path):
    assert flops.main(["--png", str(tmp_path / "f.png"), "--json", str(tmp_path / "f.json")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 10_000
    assert '"rows"' in (tmp_path / "f.json").read_text()
