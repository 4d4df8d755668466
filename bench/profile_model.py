"""Where the time of a prefill and of a decode step goes: m1model against transformers' MiniMax.

    python bench/profile_model.py [--tokens 4096] [--dtype float32] [--threads N] [--steps 8] [--rows 25]

Builds the model of bench_model.py (same weights for both), then runs each
implementation under torch.profiler with a record_function range around every
part of every decoder layer (input_layernorm, self_attn, post_attention_layernorm,
mlp; both implementations use these module names) and around the embedding and
the final norm. Prints, per implementation and phase, the total time of each
part summed over layers, and the operators with the most self CPU time.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict

import torch
from bench_model import DTYPES, Ours, Theirs, load_transformers

from m1model import M1Config, M1ForCausalLM

PARTS = ("embed_tokens", "input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "norm")


def label_parts(model: torch.nn.Module, tag: str) -> None:
    """Wraps the forward of every module named in PARTS in a record_function range '<tag>.<part>'."""
    for name, module in model.named_modules():
        part = name.rsplit(".", 1)[-1]
        if part not in PARTS or name.startswith("lm_head"):
            continue
        ranges: list = []

        def pre(_m, _a, label=f"{tag}.{part}", ranges=ranges):
            ranges.append(torch.autograd.profiler.record_function(label).__enter__())

        def post(_m, _a, _o, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def summarise(prof, tag: str, calls: int, rows: int) -> None:
    """Per-part totals (ms per call) and the top operators by self CPU time."""
    events = prof.key_averages()
    parts = defaultdict(float)
    for e in events:
        if e.key.startswith(tag + "."):
            parts[e.key] += e.cpu_time_total / 1e3 / calls
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / calls
    print(f"  parts (ms per call, summed over layers; total self CPU {total:.1f} ms):")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"    {k:40s} {v:9.2f}")
    print(f"  top operators by self CPU time (ms per call):")
    ops = [e for e in events if not e.key.startswith(tag + ".")]
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"    {e.key:52s} {e.self_cpu_time_total / 1e3 / calls:9.2f}  x{e.count // calls}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled (after the prefill)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--only", choices=("ours", "theirs"), default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = M1Config.preset("small")
    config = M1Config.preset("small", rotary_dim=config.head_dim)
    dtype = DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        model = M1ForCausalLM(config)
        model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
        model.save_pretrained(tmp)
        del model
        impls = {"ours": Ours(M1ForCausalLM.from_pretrained(tmp, dtype=dtype).eval()),
                 "theirs": Theirs(load_transformers(tmp, dtype))}
    label_parts(impls["ours"].model, "ours")
    label_parts(impls["theirs"].model, "theirs")
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    for tag, impl in impls.items():
        if args.only and tag != args.only:
            continue
        impl.prefill(ids[:, :64], 4)  # warm-up
        impl.step(torch.zeros(1, dtype=torch.long))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits = impl.prefill(ids, args.steps + 1)
        print(f"== {tag} prefill {args.tokens} tokens, {args.dtype}, {torch.get_num_threads()} threads")
        summarise(prof, tag, 1, args.rows)
        tok = logits.argmax(-1)
        tok = impl.step(tok).argmax(-1)  # first step outside the profile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                tok = impl.step(tok).argmax(-1)
        print(f"== {tag} decode step at {args.tokens}, {args.dtype}, {torch.get_num_threads()} threads")
        summarise(prof, tag, args.steps, args.rows)


if __name__ == "__main__":
    main()
