"""Prefill and decode speed of m1model against transformers' MiniMax on the same weights (CPU).

    python bench/bench_model.py [--tokens 4096] [--decode-steps 32] [--repeat 3] [--batch 1 [4 8 ...]]
        [--dtype float32] [--preset small] [--layers N] [--threads N] [--reference]

One random M1-shaped model (preset "small": 7 lightning + 1 softmax layer,
8 heads x 128, 8 experts top-2, block 256; RoPE over the whole head so that
transformers computes the same function) is saved once and loaded by both
implementations, which then run in the same process:

  prefill  a prompt of --tokens tokens per sequence, ending with the logits of
           the last position and a filled cache (what generation needs);
  decode   --decode-steps greedy steps after that prefill, one token per sequence
           per step (the median step time is reported).

The two implementations alternate (prefill, prefill, ..., then step, step, ...)
and the speedup is the median of the paired ratios, with their range: the
machine's load changes during a run, and pairing makes the ratio robust to it.
The memory read rate (a streaming sum, GB/s) is measured before and after each
batch size and stored: decode steps are bound by it, and on a shared host it
drifts.
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
from common import memory_read_gbs, mm_gflops, print_table, write_json

from m1model import M1Config, M1ForCausalLM, ops
from m1model.model import lightning_block_size

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


class Ours:
    """m1model prefill (last-position fp32 logits + filled cache) and greedy decode steps."""

    def __init__(self, model: M1ForCausalLM) -> None:
        self.model, self.W = model, model.lm_head.weight

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, room: int) -> torch.Tensor:
        self.cache = self.model.new_cache(ids.shape[0], ids.shape[1] + room)
        return ops.fp32_logits(self.model.hidden_states(ids, cache=self.cache)[:, -1], self.W)

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return ops.fp32_logits(self.model.hidden_states(tok[:, None], cache=self.cache)[:, 0], self.W)


class Theirs:
    """transformers' MiniMaxForCausalLM doing the same with its MiniMaxCache."""

    def __init__(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, room: int) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=tok[:, None], past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()


def measure(ours: Ours, theirs: Theirs, ids: torch.Tensor, steps: int, repeat: int):
    """Alternates the two implementations (prefill by prefill, then decode step by step) so that
    a change in the machine's load hits both; returns the paired timings and the last logits."""
    prefill = {"ours": [], "theirs": []}
    for _ in range(repeat):
        lo, t = timed(lambda: ours.prefill(ids, steps + 1))
        prefill["ours"].append(t)
        lt, t = timed(lambda: theirs.prefill(ids, steps + 1))
        prefill["theirs"].append(t)
    decode = {"ours": [], "theirs": []}
    tok_o, tok_t = lo.argmax(-1), lt.argmax(-1)
    for _ in range(steps):
        out, t = timed(lambda: ours.step(tok_o))
        decode["ours"].append(t)
        tok_o = out.argmax(-1)
        out, t = timed(lambda: theirs.step(tok_t))
        decode["theirs"].append(t)
        tok_t = out.argmax(-1)
    return prefill, decode, lo, lt


def ratios(timings: dict) -> list[float]:
    return [t / o for o, t in zip(timings["ours"], timings["theirs"])]


def prefill_flops(config: M1Config, B: int, T: int, bs: int) -> float:
    """Matmul FLOPs of a prefill: 2 x active parameters per token (LM head once per sequence) plus
    attention: causal softmax QK^T and PV, and the lightning blockwise terms at the block bs the
    model runs (intra-block QK^T and PV on half-filled blocks, inter-block Q S and the state
    update K^T V)."""
    n = config.param_counts()
    per_token = n["active"] - n["embedding"] - n["lm_head"]
    H, Dh = config.num_attention_heads, config.head_dim
    softmax = len(config.softmax_layers) * 2 * H * Dh * T * T  # 2 products x T^2 / 2 pairs x 2 FLOPs
    lightning = len(config.linear_layers) * H * (2 * Dh * T * min(bs, T) + 4 * T * Dh * Dh)
    return B * (2 * per_token * T + softmax + lightning + 2 * n["lm_head"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=None, help="override the layer count (keeps 1 softmax in 8)")
    p.add_argument("--tokens", type=int, default=4096, help="prompt length per sequence")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, one table (and JSON) each")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="prefills per implementation (alternating)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--reference", action="store_true", help="run m1model on its pure-PyTorch references")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
        ours_model = M1ForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        theirs_model = load_transformers(tmp, dtype)

    status = ops.status()
    print("m1model ops:", status)
    ceiling = mm_gflops(dtype=dtype)  # in the weights' dtype: bf16 GEMMs can be much faster than fp32 ones
    ours, theirs = Ours(ours_model), Theirs(theirs_model)
    for B in args.batch:
        run_batch(args, config, ours, theirs, B, ceiling, status)


def run_batch(args, config: M1Config, ours: Ours, theirs: Theirs, B: int, ceiling: float, status: dict) -> None:
    """One batch size: measures, prints the table, writes bench/results/model_<...>_B<B>_....json."""
    T = args.tokens
    ids = torch.randint(0, config.vocab_size, (B, T))
    read_before = memory_read_gbs()
    # Warm-up on a short prompt (allocator, thread pool, lazily built tables).
    measure(ours, theirs, ids[:, :64], 2, 1)
    prefill, decode, lo, lt = measure(ours, theirs, ids, args.decode_steps, args.repeat)
    read_after = memory_read_gbs()
    agree = ((lo.double() - lt.double()).norm() / lt.double().norm()).item()
    print(f"prefill last-position logits, relative difference m1model vs transformers: {agree:.2e}")

    flops = prefill_flops(config, B, T, lightning_block_size(config.block_size, ours.model.device))
    med = {k: {who: statistics.median(v) for who, v in d.items()} for k, d in (("prefill", prefill), ("decode", decode))}
    rows = []
    for phase, d, n in (("prefill", prefill, B * T), (f"decode @{T}", decode, B)):
        m = med["prefill" if phase == "prefill" else "decode"]
        r = ratios(d)
        rows.append(dict(phase=phase, ours_tps=n / m["ours"], hf_tps=n / m["theirs"], speedup=statistics.median(r),
                         lo=min(r), hi=max(r),
                         gflops=flops / m["ours"] / 1e9 if phase == "prefill" else None,
                         of_ceiling=flops / m["ours"] / 1e9 / ceiling if phase == "prefill" else None))
    print(f"{args.preset}: {config.num_hidden_layers} layers, D={config.hidden_size}, H={config.num_attention_heads}"
          f"x{config.head_dim}, E={config.num_local_experts} top-{config.num_experts_per_tok}, {args.dtype}, "
          f"B={B}, T={T}, {torch.get_num_threads()} threads, torch.mm {args.dtype} ceiling {ceiling:.0f} GFLOP/s, "
          f"memory read {read_before:.0f} -> {read_after:.0f} GB/s")
    print("speedup = transformers time / m1model time, median of the paired runs [min, max]")
    print_table(rows, [("phase", "phase", "s"), ("ours_tps", "m1model tok/s", ".1f"),
                       ("hf_tps", "transformers tok/s", ".1f"), ("speedup", "speedup", ".2f"),
                       ("lo", "min", ".2f"), ("hi", "max", ".2f"),
                       ("gflops", "m1 GFLOP/s", ".1f"), ("of_ceiling", "of mm ceiling", ".2f")])
    write_json(f"model_{args.preset}_{args.dtype}_B{B}_T{T}_threads{torch.get_num_threads()}", {
        "config": config.to_dict(), "dtype": args.dtype, "batch": B, "tokens": T, "repeat": args.repeat,
        "decode_steps": args.decode_steps, "ops_status": status, "reference": args.reference,
        "mm_gflops": ceiling, "memory_read_gbs": [read_before, read_after], "logits_rel_diff": agree, "rows": rows,
        "prefill_s": prefill, "decode_step_s": decode,
    })


if __name__ == "__main__":
    main()
