"""Prefill and decode speed of m1model against transformers' MiniMax on the same weights (CPU).

    python bench/bench_model.py [--tokens 4096] [--decode-steps 32] [--batch 1] [--dtype float32]
        [--preset small] [--layers N] [--reference]

One random M1-shaped model (preset "small": 7 lightning + 1 softmax layer,
8 heads x 128, 8 experts top-2, block 256; RoPE over the whole head so that
transformers computes the same function) is saved once and loaded by both
implementations, which then run in the same process:

  prefill  a prompt of --tokens tokens per sequence, ending with the logits of
           the last position and a filled cache (what generation needs);
  decode   --decode-steps greedy steps after that prefill, one token per sequence
           per step (the median step time is reported).

Both are checked to agree (relative error of the prefill's last logits) before
anything is timed. ops.status() is printed and stored: an op that m1ops does not
provide yet runs on its PyTorch stand-in, and the numbers then say little about
the kernels.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import mm_gflops, print_table, write_json

from m1model import M1Config, M1ForCausalLM, ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_transformers(path, dtype):
    from transformers import MiniMaxForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return MiniMaxForCausalLM.from_pretrained(path, dtype=dtype).eval()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@torch.no_grad()
def run_ours(model: M1ForCausalLM, ids: torch.Tensor, steps: int):
    """(last logits of the prefill [B, V], prefill seconds, per-step decode seconds)."""
    B, T = ids.shape
    W = model.lm_head.weight

    def prefill():
        cache = model.new_cache(B, T + steps + 1)
        hidden = model.hidden_states(ids, cache=cache)[:, -1]
        return ops.fp32_logits(hidden, W), cache

    (logits, cache), t_prefill = timed(prefill)
    step_times = []
    tok = logits.argmax(-1)
    for _ in range(steps):
        def step():
            return ops.fp32_logits(model.hidden_states(tok[:, None], cache=cache)[:, 0], W)

        out, dt = timed(step)
        step_times.append(dt)
        tok = out.argmax(-1)
    return logits, t_prefill, step_times


@torch.no_grad()
def run_transformers(model, ids: torch.Tensor, steps: int):
    def prefill():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values

    (logits, cache), t_prefill = timed(prefill)
    step_times = []
    tok = logits.argmax(-1)
    for _ in range(steps):
        def step():
            return model(input_ids=tok[:, None], past_key_values=cache, use_cache=True)

        out, dt = timed(step)
        step_times.append(dt)
        cache = out.past_key_values
        tok = out.logits[:, -1].argmax(-1)
    return logits, t_prefill, step_times


def prefill_flops(config: M1Config, B: int, T: int) -> float:
    """Matmul FLOPs of a prefill: 2 x active parameters per token (LM head once per sequence) plus
    attention: causal softmax QK^T and PV, and the lightning blockwise terms (intra-block
    QK^T and PV on half-filled blocks, inter-block Q S and the state update K^T V)."""
    n = config.param_counts()
    per_token = n["active"] - n["embedding"] - n["lm_head"]
    H, Dh, bs = config.num_attention_heads, config.head_dim, config.block_size
    softmax = len(config.softmax_layers) * 2 * H * Dh * T * T  # 2 products x T^2 / 2 pairs x 2 FLOPs
    lightning = len(config.linear_layers) * H * (2 * Dh * T * min(bs, T) + 4 * T * Dh * Dh)
    return B * (2 * per_token * T + softmax + lightning + 2 * n["lm_head"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (keeps 1 softmax in 8)")
    p.add_argument("--tokens", type=int, default=4096, help="prompt length per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--reference", action="store_true", help="run m1model on its pure-PyTorch references")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    config = M1Config.preset(args.preset)
    config = M1Config.preset(args.preset, rotary_dim=config.head_dim)  # transformers rotates the whole head
    if args.layers:
        types = tuple("full_attention" if (i + 1) % 8 == 0 else "linear_attention" for i in range(args.layers))
        config = M1Config.preset(args.preset, rotary_dim=config.head_dim, num_hidden_layers=args.layers,
                                 layer_types=types)
    dtype = DTYPES[args.dtype]
    ops.use_reference(args.reference)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        model = M1ForCausalLM(config)
        model.init_weights(std=0.02, generator=torch.Generator().manual_seed(args.seed))
        model.save_pretrained(tmp)
        del model
        ours = M1ForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        theirs = load_transformers(tmp, dtype)

    status = ops.status()
    print("m1model ops:", status)
    ceiling = mm_gflops()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.tokens))

    # Warm-up on a short prompt (allocator, thread pool, lazily built tables).
    run_ours(ours, ids[:, :64], 2)
    run_transformers(theirs, ids[:, :64], 2)

    lo, t_pre_ours, steps_ours = run_ours(ours, ids, args.decode_steps)
    lt, t_pre_hf, steps_hf = run_transformers(theirs, ids, args.decode_steps)
    agree = ((lo.double() - lt.double()).norm() / lt.double().norm()).item()
    print(f"prefill last-position logits, relative difference m1model vs transformers: {agree:.2e}")

    B, T = args.batch, args.tokens
    flops = prefill_flops(config, B, T)
    step_ours, step_hf = statistics.median(steps_ours), statistics.median(steps_hf)
    rows = [
        dict(phase="prefill", tokens=B * T, ours_tps=B * T / t_pre_ours, hf_tps=B * T / t_pre_hf,
             speedup=t_pre_hf / t_pre_ours, gflops=flops / t_pre_ours / 1e9,
             of_ceiling=flops / t_pre_ours / 1e9 / ceiling),
        dict(phase=f"decode @{T}", tokens=B * args.decode_steps, ours_tps=B / step_ours, hf_tps=B / step_hf,
             speedup=step_hf / step_ours),
    ]
    print(f"{args.preset}: {config.num_hidden_layers} layers, D={config.hidden_size}, H={config.num_attention_heads}"
          f"x{config.head_dim}, E={config.num_local_experts} top-{config.num_experts_per_tok}, {args.dtype}, "
          f"B={B}, torch.mm ceiling {ceiling:.0f} GFLOP/s")
    print_table(rows, [("phase", "phase", "s"), ("tokens", "tokens", "d"), ("ours_tps", "m1model tok/s", ".1f"),
                       ("hf_tps", "transformers tok/s", ".1f"), ("speedup", "speedup", ".2f"),
                       ("gflops", "m1 GFLOP/s", ".1f"), ("of_ceiling", "of mm ceiling", ".2f")])
    write_json(f"model_{args.preset}_{args.dtype}_B{B}_T{T}", {
        "config": config.to_dict(), "dtype": args.dtype, "batch": B, "tokens": T,
        "decode_steps": args.decode_steps, "ops_status": status, "reference": args.reference,
        "mm_gflops": ceiling, "logits_rel_diff": agree, "rows": rows,
        "prefill_s": {"ours": t_pre_ours, "transformers": t_pre_hf},
        "decode_step_s": {"ours": steps_ours, "transformers": steps_hf},
    })


if __name__ == "__main__":
    main()
