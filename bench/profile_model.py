"""Where the time of a prefill and of a decode step goes: m1model against transformers' MiniMax.

    python bench/profile_model.py [--tokens 4096] [--dtype float32] [--threads N] [--steps 8] [--rows 25]
        [--only ours|theirs] [--preset small]

Builds the model of bench_model.py (same weights for both), then runs each
implementation under torch.profiler with a record_function range around every
part of every decoder layer (input_layernorm, self_attn, post_attention_layernorm,
mlp; both implementations use these module names) and around the embedding and
the final norm. Prints, per implementation and phase, the total time of each
part summed over layers, and the operators with the most self CPU time.

For m1model it then splits a decode step's wall time (no profiler) into the
weight-reading kernels (m1ops.fp32_logits for the projections and the head,
fused_moe, lightning_attn_decode) and everything else (Python, dispatch, norms,
routing, RoPE, SDPA, cache bookkeeping): the step is timed as it is and with
those three kernels replaced by stubs that return outputs of the right shape
at once, alternating, median over the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from bench_model import DTYPES, Ours, Theirs, load_transformers

import m1ops
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


@contextlib.contextmanager
def stub_kernels():
    """m1ops' weight-reading kernels return outputs of the right shape without computing them."""
    zeros: dict = {}

    def logits(hidden, weight):
        key = (hidden.shape[0], weight.shape[0], hidden.device)
        if key not in zeros:
            zeros[key] = torch.zeros(hidden.shape[0], weight.shape[0], device=hidden.device)
        return zeros[key]

    stubs = {"fp32_logits": logits, "fused_moe": lambda x, *_: x,
             "lightning_attn_decode": lambda q, k, v, *_, **__: v}
    saved = {name: getattr(m1ops, name) for name in stubs}
    for name, fn in stubs.items():
        setattr(m1ops, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(m1ops, name, fn)


def decode_split(impl: Ours, tok: torch.Tensor, steps: int) -> None:
    """Median decode step with the kernels and with them stubbed out (alternating)."""
    full, rest = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = impl.step(tok).argmax(-1)
        full.append(time.perf_counter() - t0)
        with stub_kernels():
            t0 = time.perf_counter()
            impl.step(tok)
            rest.append(time.perf_counter() - t0)
    f, r = statistics.median(full) * 1e3, statistics.median(rest) * 1e3
    print(f"  decode step {f:.2f} ms = kernels (fp32_logits, fused_moe, lightning_attn_decode) {f - r:.2f} ms"
          f" + everything else {r:.2f} ms (the step with those kernels stubbed out)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="model preset (bench_model.py's default: small)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="decode steps profiled (after the prefill)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--only", choices=("ours", "theirs"), default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = M1Config.preset(args.preset)
    config = M1Config.preset(args.preset, rotary_dim=config.head_dim)  # transformers rotates the whole head
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
    split_steps = max(args.steps, 16)
    for tag, impl in impls.items():
        if args.only and tag != args.only:
            continue
        impl.prefill(ids[:, :64], 4)  # warm-up
        impl.step(torch.zeros(1, dtype=torch.long))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits = impl.prefill(ids, args.steps + 2 + 2 * split_steps)  # room for every step below
        print(f"== {tag} prefill {args.tokens} tokens, {args.dtype}, {torch.get_num_threads()} threads")
        summarise(prof, tag, 1, args.rows)
        tok = logits.argmax(-1)
        tok = impl.step(tok).argmax(-1)  # first step outside the profile
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                tok = impl.step(tok).argmax(-1)
        print(f"== {tag} decode step at {args.tokens}, {args.dtype}, {torch.get_num_threads()} threads")
        summarise(prof, tag, args.steps, args.rows)
        if tag == "ours":
            decode_split(impl, tok, split_steps)


if __name__ == "__main__":
    main()
