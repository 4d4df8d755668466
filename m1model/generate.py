"""Command line generation, streaming tokens to stdout as they are sampled.

    python -m m1model.generate --model DIR --prompt "Once upon a time" [--max-new-tokens 64]
        [--temperature 0.7 --top-p 0.95 --top-k 50 --seed 0] [--dtype bfloat16] [--reference]
    python -m m1model.generate --model DIR --prompt-ids "1 2 3"      (no tokenizer.json needed)

The text goes to stdout; a summary line (tokens, stop reason, speed) to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from m1model import ops
from m1model.model import M1ForCausalLM
from m1model.tokenizer import StreamDecoder, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m m1model.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in --model)")
    src.add_argument("--prompt-ids", help="prompt as space-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--repetition-window", type=int, default=3000)
    p.add_argument("--repetition-prob", type=float, default=0.99)
    p.add_argument("--reference", action="store_true", help="run every op on its pure-PyTorch reference")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ops.use_reference(args.reference)
    tokenizer = Tokenizer.from_pretrained(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            print(f"error: {args.model} has no tokenizer.json; pass --prompt-ids instead", file=sys.stderr)
            return 2
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = [int(t) for t in args.prompt_ids.split()]
    model = M1ForCausalLM.from_pretrained(args.model, dtype=DTYPES.get(args.dtype), device=args.device)
    model.eval()

    eos = model.config.eos_token_id
    if eos is None and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos = tokenizer.eos_token_id
    stream = StreamDecoder(tokenizer) if tokenizer is not None else None

    def on_token(_: int, token: int) -> None:
        sys.stdout.write(stream.push(token) if stream is not None else f"{token} ")
        sys.stdout.flush()

    t0 = time.perf_counter()
    out = model.generate(
        [prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_token_id=eos if eos is not None else (),
        generator=torch.Generator(model.device).manual_seed(args.seed),
        repetition_window=args.repetition_window, repetition_prob=args.repetition_prob, on_token=on_token,
    )
    seconds = time.perf_counter() - t0
    sys.stdout.write("\n")
    n = len(out.tokens[0])
    print(f"[{n} tokens, stopped: {out.stop_reasons[0]}, {n / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
