"""Inference FLOPs of MiniMax-M1 against DeepSeek-R1 and Qwen3-235B-A22B as generation grows.

    python bench/flops.py [--png bench/results/flops.png] [--json bench/results/flops.json]

Model (DESIGN 7): generating token t (context t, t = 1..N) costs

    2 x (the parameters that token multiplies: active experts, attention
         projections, router, dense MLPs, the LM head)            constant in t
  + attention over the context:
        softmax layer    2 * H * (d_qk + d_v) * t                 scores, then values
        MLA expanded     2 * H * (192 + 128) * t                  k and v decompressed per head
        MLA absorbed     2 * H * ((512 + 64) + 512) * t           attention over the latent cache
        MLA v-padded     2 * H * (192 + 192) * t                  expanded, v padded to d_qk (as
                                                                  FlashAttention-style kernels run MLA)
        lightning layer  4 * H * Dk * Dv                          k^T v into the state, q S out

and the cumulative cost of N tokens is the sum over t = 1..N (closed form:
N * constant + coeff * N (N + 1) / 2). Elementwise work (norms, activations,
softmax, decay) is left out: it is below 1% of either model's count.

Architectures come from config objects: M1 from m1model's `minimax-m1` preset,
DeepSeek-R1 (the DeepSeek-V3 architecture) and Qwen3-235B-A22B from their
published config.json values, written below as dataclasses. The active
parameter counts they imply are printed and checked against the published
ones (M1 45.9B, R1 37B, Qwen3 22B).

The paper (Figure 1, right) gives M1/R1 = 0.385 at 64K, 0.287 at 100K and 0.244
at 128K generated tokens without saying how it counted; `main` prints our
ratios beside them for each way of counting MLA and says which one is closest.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from m1model.config import M1Config  # noqa: E402
from m1ops.flops import lightning_decode_flops, lightning_prefill_flops, logits_flops, moe_flops  # noqa: E402

GEN_LENGTHS = [8_192, 32_768, 65_536, 100_000, 131_072, 1_048_576]
PAPER_M1_OVER_R1 = {65_536: 0.385, 100_000: 0.287, 131_072: 0.244}  # Figure 1 (right)
PUBLISHED_ACTIVE = {"MiniMax-M1": 45.9e9, "DeepSeek-R1": 37e9, "Qwen3-235B-A22B": 22e9}
PUBLISHED_TOTAL = {"MiniMax-M1": 456e9, "DeepSeek-R1": 671e9, "Qwen3-235B-A22B": 235e9}


@dataclass(frozen=True)
class DeepSeekV3Config:
    """DeepSeek-V3 / R1 config.json (the MTP module is not used for generation)."""

    vocab_size: int = 129_280
    hidden_size: int = 7_168
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int = 1_536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2_048
    first_k_dense_replace: int = 3  # the first 3 layers have a dense MLP
    intermediate_size: int = 18_432  # their width


@dataclass(frozen=True)
class Qwen3MoeConfig:
    """Qwen3-235B-A22B config.json."""

    vocab_size: int = 151_936
    hidden_size: int = 4_096
    num_hidden_layers: int = 94
    num_attention_heads: int = 64
    num_key_value_heads: int = 4
    head_dim: int = 128
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 1_536
    tie_word_embeddings: bool = False


@dataclass
class Counts:
    """One model's parameters and per-token FLOPs, split by component."""

    name: str
    total_params: float  # every weight, embeddings included
    active_params: float  # weights one token multiplies, embedding lookup and LM head excluded
    head_params: float  # LM head (untied)
    attn_proj_flops: float  # per token: q/k/v/o (or MLA) projections, all layers
    mlp_flops: float  # per token: active experts + shared/dense MLPs + routers, all layers
    head_flops: float  # per token: the LM head
    attn_const_flops: float  # per token: context-independent attention core (lightning layers)
    attn_ctx_coeff: float  # per token: attention core cost per token of context (softmax / MLA layers)

    @property
    def const_flops(self) -> float:
        return self.attn_proj_flops + self.mlp_flops + self.head_flops + self.attn_const_flops

    def per_token(self, t: int) -> float:
        """FLOPs of generating the token at context length t."""
        return self.const_flops + self.attn_ctx_coeff * t

    def cumulative(self, n: int) -> float:
        """FLOPs of generating n tokens, contexts 1..n: sum of per_token(t)."""
        return self.const_flops * n + self.attn_ctx_coeff * n * (n + 1) / 2

    def split(self, t: int) -> dict[str, float]:
        """Per-token FLOPs at context t by component: attention, MoE/MLP, head."""
        return {
            "attention": self.attn_proj_flops + self.attn_const_flops + self.attn_ctx_coeff * t,
            "moe_mlp": self.mlp_flops,
            "head": self.head_flops,
        }


def m1_counts(cfg: M1Config, name: str = "MiniMax-M1") -> Counts:
    D, H, Hkv, Dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, k, F, V = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size, cfg.vocab_size
    n_lin, n_soft = len(cfg.linear_layers), len(cfg.softmax_layers)
    lightning_proj = D * 3 * H * Dh + D * H * Dh + H * Dh * D  # qkv, output gate, out_proj
    softmax_proj = D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D  # q, k, v, o
    expert = 3 * D * F  # gate, up, down
    router = E * D
    L = cfg.num_hidden_layers
    attn_params = n_lin * lightning_proj + n_soft * softmax_proj
    active = attn_params + L * (k * expert + router)
    head = 0 if cfg.tie_word_embeddings else V * D
    # The m1 ops' terms come from m1ops.flops, the formulas FlopCounterMode uses for them.
    return Counts(
        name=name,
        total_params=attn_params + L * (E * expert + router) + V * D + head,
        active_params=active,
        head_params=V * D,
        attn_proj_flops=2 * attn_params,
        mlp_flops=L * (moe_flops(1, k, D, F) + 2 * router),
        head_flops=logits_flops(1, V, D),
        attn_const_flops=n_lin * lightning_decode_flops(1, H, Dh, Dh),
        attn_ctx_coeff=n_soft * 2 * H * (Dh + Dh),
    )


def m1_prefill_flops(cfg: M1Config, seq_lens: list[int], block_size: int | None = None) -> dict[str, float]:
    """FLOPs of one m1model forward without a cache (a prefill, or the forward of a
    training step) over sequences of the given lengths, by component, counted the way
    torch.utils.flop_counter counts them: what differs from len(seq_lens) x the
    per-token decode counts is
      - lightning layers run the blockwise prefill (intra-block products, a
        2 C (K + V) per-token term for block size C: m1ops.flops);
      - softmax layers: a sequence of L tokens costs 2 H (d_qk + d_v) L^2, the full
        score matrix, as torch's SDPA formula counts it (the causal half of it,
        L (L + 1) / 2 pairs, is the work the decode model sums).
    The head counts every position (m1model's forward returns all logits). block_size: the
    lightning block the forward runs (m1model.model.lightning_block_size; default the config's)."""
    m1 = m1_counts(cfg)
    tokens = sum(seq_lens)
    n_lin, n_soft = len(cfg.linear_layers), len(cfg.softmax_layers)
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    return {
        "attention projections": m1.attn_proj_flops * tokens,
        "lightning core": n_lin * lightning_prefill_flops(seq_lens, H, Dh, Dh, block_size or cfg.block_size),
        "softmax core": m1.attn_ctx_coeff * sum(n * n for n in seq_lens),
        "moe_mlp": m1.mlp_flops * tokens,
        "head": m1.head_flops * tokens,
    }


def deepseek_counts(cfg: DeepSeekV3Config, mla: str = "expanded", name: str = "DeepSeek-R1") -> Counts:
    """mla = "expanded": per-head k, v decompressed (d_qk 192, d_v 128); "absorbed": the
    up-projections folded into q and the output, attention over the 512 + 64 latent;
    "vpad": expanded with v zero-padded to d_qk = 192, the shape FlashAttention-style
    kernels compute MLA in (they need equal q/k and v head dims)."""
    D, H, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    nope, rope, dv, r_kv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    q_params = D * cfg.q_lora_rank + cfg.q_lora_rank * H * (nope + rope)
    kv_a = D * (r_kv + rope)
    kv_b = r_kv * H * (nope + dv)  # W_UK and W_UV
    o_params = H * dv * D
    attn_params = L * (q_params + kv_a + kv_b + o_params)
    # Expanded: kv_b makes this token's k_nope and v (2 * kv_b). Absorbed: q_nope @ W_UK and
    # the latent output @ W_UV per head, the same 2 * kv_b FLOPs. The projections cost the same.
    attn_proj_flops = 2 * attn_params
    if mla == "expanded":
        ctx = 2 * H * ((nope + rope) + dv)
    elif mla == "absorbed":
        ctx = 2 * H * ((r_kv + rope) + r_kv)
    elif mla == "vpad":
        ctx = 2 * H * ((nope + rope) + (nope + rope))
    else:
        raise ValueError(f"mla must be 'expanded', 'absorbed' or 'vpad', got {mla!r}")
    expert = 3 * D * cfg.moe_intermediate_size
    n_moe = L - cfg.first_k_dense_replace
    router = cfg.n_routed_experts * D
    dense = cfg.first_k_dense_replace * 3 * D * cfg.intermediate_size
    active_mlp = dense + n_moe * ((cfg.num_experts_per_tok + cfg.n_shared_experts) * expert + router)
    total_mlp = dense + n_moe * ((cfg.n_routed_experts + cfg.n_shared_experts) * expert + router)
    V = cfg.vocab_size
    return Counts(
        name=name,
        total_params=attn_params + total_mlp + 2 * V * D,
        active_params=attn_params + active_mlp,
        head_params=V * D,
        attn_proj_flops=attn_proj_flops,
        mlp_flops=2 * active_mlp,
        head_flops=2 * V * D,
        attn_const_flops=0.0,
        attn_ctx_coeff=L * ctx,
    )


def qwen3_counts(cfg: Qwen3MoeConfig, name: str = "Qwen3-235B-A22B") -> Counts:
    D, H, Hkv, Dh, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    attn_params = L * (D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D)
    expert = 3 * D * cfg.moe_intermediate_size
    router = cfg.num_experts * D
    V = cfg.vocab_size
    return Counts(
        name=name,
        total_params=attn_params + L * (cfg.num_experts * expert + router) + (1 if cfg.tie_word_embeddings else 2) * V * D,
        active_params=attn_params + L * (cfg.num_experts_per_tok * expert + router),
        head_params=V * D,
        attn_proj_flops=2 * attn_params,
        mlp_flops=2 * L * (cfg.num_experts_per_tok * expert + router),
        head_flops=2 * V * D,
        attn_const_flops=0.0,
        attn_ctx_coeff=L * 2 * H * (Dh + Dh),
    )


def all_counts() -> dict[str, Counts]:
    m1 = m1_counts(M1Config.preset("minimax-m1"))
    return {
        "MiniMax-M1": m1,
        "DeepSeek-R1 (MLA expanded)": deepseek_counts(DeepSeekV3Config(), "expanded", "DeepSeek-R1 (MLA expanded)"),
        "DeepSeek-R1 (MLA absorbed)": deepseek_counts(DeepSeekV3Config(), "absorbed", "DeepSeek-R1 (MLA absorbed)"),
        "DeepSeek-R1 (MLA v-padded)": deepseek_counts(DeepSeekV3Config(), "vpad", "DeepSeek-R1 (MLA v-padded)"),
        "Qwen3-235B-A22B": qwen3_counts(Qwen3MoeConfig()),
    }


def published_name(name: str) -> str:
    return name.split(" (")[0]


def check_params(counts: dict[str, Counts], tol: float = 0.03) -> list[str]:
    """Published active/total parameter counts the configs must reproduce (active: without
    embeddings and head for M1, whose 45.9B is quoted that way; with them for R1 and Qwen3)."""
    problems = []
    for name, c in counts.items():
        pub = published_name(name)
        active = c.active_params if pub == "MiniMax-M1" else c.active_params + 2 * c.head_params
        for what, ours, theirs in (("active", active, PUBLISHED_ACTIVE[pub]), ("total", c.total_params, PUBLISHED_TOTAL[pub])):
            if abs(ours / theirs - 1) > tol:
                problems.append(f"{name}: {what} params {ours / 1e9:.1f}B vs published {theirs / 1e9:.1f}B")
    return problems


MLA_VARIANTS = ("expanded", "absorbed", "v-padded")


def ratio_table(counts: dict[str, Counts]) -> list[dict]:
    m1 = counts["MiniMax-M1"]
    rows = []
    for n in GEN_LENGTHS:
        row = {"tokens": n}
        for name, c in counts.items():
            row[name] = c.cumulative(n)
        for variant in MLA_VARIANTS:
            row[f"M1/R1 {variant}"] = m1.cumulative(n) / counts[f"DeepSeek-R1 (MLA {variant})"].cumulative(n)
        row["paper M1/R1"] = PAPER_M1_OVER_R1.get(n)
        rows.append(row)
    return rows


def fitted_attention_factor(counts: dict[str, Counts]) -> float:
    """The factor on R1's (expanded) attention-over-context FLOPs that reproduces the paper's
    ratios best (least squares over its three points): how far the paper's count is from ours."""
    m1, r1 = counts["MiniMax-M1"], counts["DeepSeek-R1 (MLA expanded)"]
    # paper ratio p = M1 / (const * N + f * ctx(N))  =>  f = (M1 / p - const * N) / ctx(N)
    num = den = 0.0
    for n, p in PAPER_M1_OVER_R1.items():
        ctx = r1.attn_ctx_coeff * n * (n + 1) / 2
        target = m1.cumulative(n) / p - r1.const_flops * n
        num += target * ctx
        den += ctx * ctx
    return num / den


def plot(counts: dict[str, Counts], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(x) for x in range(1024, 131_073, 1024)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, c in counts.items():
        ax.plot([n / 1000 for n in ns], [c.cumulative(n) for n in ns], label=name,
                linestyle=":" if "absorbed" in name else "--" if "padded" in name else "-")
    ax.set_xlabel("generation length (K tokens)")
    ax.set_ylabel("cumulative FLOPs")
    ax.set_title("Inference FLOPs vs generation length")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    results = Path(__file__).resolve().parent / "results"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--png", type=Path, default=results / "flops.png")
    parser.add_argument("--json", type=Path, default=results / "flops.json")
    args = parser.parse_args(argv)

    counts = all_counts()
    print("Parameters implied by the configs (active: multiplied per token, embeddings and LM head excluded)")
    for name, c in counts.items():
        print(f"  {name:<28} total {c.total_params / 1e9:7.1f}B   active {c.active_params / 1e9:6.2f}B"
              f"   + head {c.head_params / 1e9:4.2f}B + embedding {c.head_params / 1e9:4.2f}B")
    problems = check_params(counts)
    for p in problems:
        print(f"  MISMATCH: {p}")
    print("  published: M1 456B / 45.9B active (without embeddings and head); R1 671B / 37B; Qwen3 235B / 22B")

    print("\nPer-token GFLOPs at context 64K: attention / MoE+MLP / head")
    for name, c in counts.items():
        s = c.split(65_536)
        print(f"  {name:<28} {s['attention'] / 1e9:8.1f} {s['moe_mlp'] / 1e9:8.1f} {s['head'] / 1e9:6.1f}"
              f"   (attention grows by {c.attn_ctx_coeff / 1e6:.2f} MFLOPs per context token)")

    rows = ratio_table(counts)
    print("\nCumulative FLOPs to generate N tokens, and M1/R1")
    names = list(counts)
    short = {n: n.replace("DeepSeek-R1 (MLA ", "R1 ").replace(")", "") for n in names}
    print(f"  {'N':>9} " + " ".join(f"{short[n][:16]:>16}" for n in names)
          + "".join(f" {'M1/R1 ' + v[:3]:>10}" for v in MLA_VARIANTS) + f" {'paper':>6}")
    for r in rows:
        paper = f"{r['paper M1/R1']:.3f}" if r["paper M1/R1"] else "-"
        print(f"  {r['tokens']:>9} " + " ".join(f"{r[n]:>16.3e}" for n in names)
              + "".join(f" {r['M1/R1 ' + v]:>10.3f}" for v in MLA_VARIANTS) + f" {paper:>6}")

    fit = {}
    for variant in MLA_VARIANTS:
        errs = [abs(r[f"M1/R1 {variant}"] / r["paper M1/R1"] - 1) for r in rows if r["paper M1/R1"]]
        fit[variant] = max(errs)
    print("\nLargest relative gap to the paper's three points: "
          + ", ".join(f"MLA {v} {fit[v]:.1%}" for v in MLA_VARIANTS))
    factor = fitted_attention_factor(counts)
    print(f"The paper's ratios are reproduced (least squares) by R1 attention-over-context FLOPs {factor:.3f}x our\n"
          f"expanded count: close to the 1.2x of computing MLA with v padded to 192 (v-padded above).\n"
          f"Absorbed MLA, the cheapest way to run R1's decode in FLOPs but not in memory traffic, would put\n"
          f"M1 at {rows[3]['M1/R1 absorbed']:.0%} of R1 at 100K.")

    plot(counts, args.png)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "counts": {n: {**asdict(c), "const_flops": c.const_flops} for n, c in counts.items()},
        "rows": rows, "paper": PAPER_M1_OVER_R1, "gap_to_paper": fit, "fitted_r1_attention_factor": factor,
        "param_check": problems,
    }, indent=2) + "\n")
    print(f"wrote {args.png} and {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
