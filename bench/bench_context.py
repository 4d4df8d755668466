"""Time per generated token against context length: M1's hybrid attention against all-softmax (CPU).

    python bench/bench_context.py [--contexts 256 1024 4096 16384 32768 65536] [--steps 8]
        [--preset small] [--layers N] [--threads 1]

Two models of the same shape (m1model preset "small": D 1024, 8 heads x 128,
8 experts top-2, vocab 32000, fp32), random weights:
  hybrid       M1's layout: 7 lightning layers : 1 softmax layer;
  all-softmax  the same config with every layer's attention softmax (layer_types
               all "full_attention"), i.e. a conventional transformer.

For each context length C both get a HybridCache that already holds C tokens
(random keys/values in the softmax layers' slots, random lightning states: the
time of a step does not depend on the values, and this skips a prefill whose
softmax cost is quadratic in C), then take turns generating: one decode step
(one token, last-position fp32 logits) of the hybrid model, one of the
all-softmax model, --steps times after a warm-up step each. Reported: the
median step time of each, their ratio, and beside them the analytic per-token
FLOPs of bench/flops.py for the same two configs (m1_counts(...).per_token(C)).
A flat line for the hybrid model (its one softmax layer in eight still grows,
slowly) and a growing one for all-softmax is the claim being measured.

Writes bench/results/context.json and bench/results/context.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
from common import RESULTS, write_json
from flops import m1_counts

from m1model import M1Config, M1ForCausalLM, ops
from m1model.config import FULL


def filled_cache(model: M1ForCausalLM, context: int, room: int, gen: torch.Generator):
    """A HybridCache of batch 1 that holds `context` tokens."""
    cache = model.new_cache(1, context + room)
    for layer, keys in cache.keys.items():
        keys[:, :, :context].normal_(generator=gen)
        cache.values[layer][:, :, :context].normal_(generator=gen)
    for state in cache.states.values():
        state.normal_(generator=gen).mul_(0.01)
    cache.lengths.fill_(context)
    return cache


@torch.no_grad()
def step(model: M1ForCausalLM, cache, token: torch.Tensor) -> torch.Tensor:
    hidden = model.hidden_states(token[:, None], cache=cache)[:, 0]
    return ops.fp32_logits(hidden, model.lm_head.weight)


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (  # (row key suffix, hybrid label, y label, title)
        ("ms", "M1 hybrid (7 lightning : 1 softmax)", "ms per generated token (CPU, measured)",
         "Decode step time vs context"),
        ("gflop", "M1 hybrid", "GFLOP per generated token (bench/flops.py)", "Analytic FLOPs per token"),
    )
    for ax, (key, hybrid_label, ylabel, title) in zip(axes, panels):
        ax.plot(ctx, [r[f"hybrid_{key}"] for r in rows], "o-", label=hybrid_label)
        ax.plot(ctx, [r[f"softmax_{key}"] for r in rows], "s-", label="all-softmax")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model and context")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layers", type=int, help="override the number of layers (keeps 1 softmax in 8)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default). One by default: a decode step is a few ms of "
                             "small ops, and on a shared machine every parallel region of a multi-threaded step "
                             "can wait a scheduler time slice for its second thread, which swamps the work")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    hybrid_cfg = M1Config.preset(args.preset)
    if args.layers:
        types = tuple(FULL if (i + 1) % 8 == 0 else t for i, t in enumerate(["linear_attention"] * args.layers))
        hybrid_cfg = dataclasses.replace(hybrid_cfg, num_hidden_layers=args.layers, layer_types=types)
    softmax_cfg = dataclasses.replace(hybrid_cfg, layer_types=(FULL,) * hybrid_cfg.num_hidden_layers)
    torch.manual_seed(0)
    models = {"hybrid": M1ForCausalLM(hybrid_cfg).eval(), "softmax": M1ForCausalLM(softmax_cfg).eval()}
    flops = {"hybrid": m1_counts(hybrid_cfg), "softmax": m1_counts(softmax_cfg)}
    print(f"preset {args.preset}: {len(hybrid_cfg.linear_layers)} lightning + {len(hybrid_cfg.softmax_layers)} "
          f"softmax layers vs {softmax_cfg.num_hidden_layers} softmax; {torch.get_num_threads()} threads; "
          f"ops {sorted(set(ops.status().values()))}; load average {os.getloadavg()[0]:.1f}", flush=True)

    rows = []
    gen = torch.Generator().manual_seed(1)
    load_before = os.getloadavg()[0]
    for context in args.contexts:
        caches = {k: filled_cache(m, context, args.steps + 2, gen) for k, m in models.items()}
        token = torch.randint(0, hybrid_cfg.vocab_size, (1,), generator=gen)
        times: dict[str, list[float]] = {k: [] for k in models}
        for i in range(args.steps + 1):
            for name, model in models.items():  # alternate: both see the same load
                t0 = time.perf_counter()
                logits = step(model, caches[name], token)
                dt = time.perf_counter() - t0
                if i > 0:  # the first step of each is a warm-up
                    times[name].append(dt * 1e3)
                if not torch.isfinite(logits).all():
                    raise RuntimeError(f"{name} produced non-finite logits at context {context}")
        row = dict(context=context, hybrid_ms=statistics.median(times["hybrid"]),
                   softmax_ms=statistics.median(times["softmax"]),
                   hybrid_gflop=flops["hybrid"].per_token(context) / 1e9,
                   softmax_gflop=flops["softmax"].per_token(context) / 1e9)
        # The ratio of each alternated pair, then the median: robust to load that changes during the run.
        pair = sorted(s / h for h, s in zip(times["hybrid"], times["softmax"]))
        row.update(ratio=statistics.median(pair), ratio_min=pair[0], ratio_max=pair[-1],
                   flop_ratio=row["softmax_gflop"] / row["hybrid_gflop"])
        rows.append(row)
        print(f"context {context:>6}: hybrid {row['hybrid_ms']:7.1f} ms  all-softmax {row['softmax_ms']:7.1f} ms  "
              f"ratio {row['ratio']:.2f} ({row['ratio_min']:.2f}..{row['ratio_max']:.2f}); "
              f"analytic {row['hybrid_gflop']:.3f} vs {row['softmax_gflop']:.3f} GFLOP/token "
              f"({row['flop_ratio']:.2f}x)", flush=True)
        del caches

    first, last = rows[0], rows[-1]
    growth = {k: last[f"{k}_ms"] / first[f"{k}_ms"] for k in models}
    print(f"from context {first['context']} to {last['context']}: hybrid x{growth['hybrid']:.2f}, "
          f"all-softmax x{growth['softmax']:.2f}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    plot(rows, RESULTS / "context.png")
    write_json("context", {"preset": args.preset, "config_hybrid": hybrid_cfg.to_dict(), "steps": args.steps,
                           "rows": rows, "growth": growth, "load_average": [load_before, os.getloadavg()[0]]})
    print(f"wrote {RESULTS / 'context.png'}")


if __name__ == "__main__":
    main()
