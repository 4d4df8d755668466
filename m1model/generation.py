"""Generation with a hybrid cache (DESIGN 5): batched ragged prompts, sampling, stop reasons.

    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.7, top_p=0.95,
                         generator=torch.Generator().manual_seed(0))
    out.tokens[i], out.logprobs[i], out.stop_reasons[i]

The prompts are packed into one varlen prefill (no padding anywhere, so padding
never touches a lightning state); each step then feeds one token per running
sequence. Finished sequences leave the batch (their cache rows are dropped).

Log-probs: of the sampled token under softmax(logits / temperature) in fp32,
before top-k / top-p truncation (the distribution a trainer recomputes with
m1ops.fp32_logprobs at the same temperature); greedy decoding reports them
under temperature 1.

Reproducibility: with one torch.Generator the samples of a prompt depend on the
other prompts of the batch (they share the stream). With one generator per
prompt (a list), each prompt's samples depend only on its own generator, so
the same prompt gives the same continuation in any batch -- what a trainer
needs to split rollouts across data-parallel ranks without changing them.

Repetition stop (MiniMax-M1 paper): a sequence halts when its last
`repetition_window` generated tokens each had probability > `repetition_prob`
(under the same distribution as the log-probs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from m1model import ops

EOS, MAX_NEW_TOKENS, REPETITION = "eos", "max_new_tokens", "repetition"


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per prompt (the EOS token included when it stopped on one)
    logprobs: list[torch.Tensor]  # [len(tokens[i])] float32 log-prob of each generated token
    stop_reasons: list[str]  # "eos" | "max_new_tokens" | "repetition"


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] float32 -> (tokens [B] int64, log-probs [B] float32); temperature 0 is greedy.

    generator: one generator for the batch, or a sequence of B generators (row b samples with its own).
    """
    logits = logits.float()
    if temperature == 0.0:
        tokens = logits.argmax(dim=-1)  # first maximum on ties
        logp = torch.log_softmax(logits, dim=-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    z = logits / temperature
    logp = torch.log_softmax(z, dim=-1)
    masked = z
    if top_k is not None and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        masked = masked.masked_fill(z < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_z, order = torch.sort(masked, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above
        drop_sorted = before >= top_p  # keeps the smallest prefix holding top_p of the mass (never empty)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        masked = masked.masked_fill(drop, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    if generator is None or isinstance(generator, torch.Generator):
        tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        if len(generator) != probs.shape[0]:
            raise ValueError(f"sample_next: got {len(generator)} generators for {probs.shape[0]} rows")
        tokens = torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def _as_prompts(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2:
            raise ValueError(f"prompts as a tensor must be [B, T], got shape {tuple(prompts.shape)}")
        return [row.tolist() for row in prompts]
    out = [list(map(int, p)) for p in prompts]
    if not out:
        raise ValueError("prompts is empty")
    return out


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    repetition_window: int = 3000,
    repetition_prob: float = 0.99,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationOutput:
    """Continues every prompt by up to max_new_tokens tokens.

    Args:
        prompts: token-id lists of any lengths (>= 1), or a [B, T] tensor.
        temperature: 0 = greedy; otherwise sample from softmax(logits / temperature).
        top_k, top_p: keep the k most likely tokens / the smallest set holding top_p of the mass.
        eos_token_id: id or ids that end a sequence; None: the config's; () never stops on EOS.
        generator: a torch.Generator on the model's device, for reproducible sampling; or one
            generator per prompt, so that each prompt's samples do not depend on the batch.
        repetition_window, repetition_prob: the repetition stop (see the module docstring).
        on_token: called as on_token(prompt_index, token) for every generated token, in order.
    """
    prompt_ids = _as_prompts(prompts)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_window < 1 or not 0.0 <= repetition_prob <= 1.0:
        raise ValueError("repetition_window must be >= 1 and repetition_prob in [0, 1]")
    V = model.config.vocab_size
    if any(t < 0 or t >= V for p in prompt_ids for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {V})")
    generators = None
    if generator is not None and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if len(generators) != len(prompt_ids):
            raise ValueError(f"generator: got {len(generators)} generators for {len(prompt_ids)} prompts")
    eos = _eos_set(model.config.eos_token_id if eos_token_id is None else eos_token_id)
    log_p = math.log(repetition_prob) if repetition_prob > 0 else -math.inf  # prob > p  <=>  log-prob > log p

    B, device = len(prompt_ids), model.device
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprobs: list[list[float]] = [[] for _ in range(B)]
    reasons: list[str] = [MAX_NEW_TOKENS] * B
    if max_new_tokens == 0:
        return GenerationOutput(tokens, [torch.zeros(0) for _ in range(B)], reasons)

    lengths = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long, device=device)
    cache = model.new_cache(B, int(lengths.max()) + max_new_tokens)
    packed = torch.tensor([t for p in prompt_ids for t in p], dtype=torch.long, device=device)[None]
    cu = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    hidden = model.hidden_states(packed, cu_seqlens=cu, cache=cache)[0, cu[1:] - 1]  # [B, D] last prompt token

    active = list(range(B))  # prompt index of each cache row
    confident = [0] * B  # current run of tokens with probability > repetition_prob
    for step in range(max_new_tokens):
        logits = ops.fp32_logits(hidden, model.lm_head.weight)  # [b, V]
        rows_gen = generator if generators is None else [generators[i] for i in active]
        next_tok, next_lp = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                        generator=rows_gen)
        keep = []
        for row, (i, tok, lp) in enumerate(zip(active, next_tok.tolist(), next_lp.tolist())):
            tokens[i].append(tok)
            logprobs[i].append(lp)
            if on_token is not None:
                on_token(i, tok)
            confident[i] = confident[i] + 1 if lp > log_p else 0
            if tok in eos:
                reasons[i] = EOS
            elif confident[i] >= repetition_window:
                reasons[i] = REPETITION
            else:
                keep.append(row)
        if step == max_new_tokens - 1 or not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.select(index)
            next_tok = next_tok[index]
            active = [active[r] for r in keep]
        hidden = model.hidden_states(next_tok[:, None], cache=cache)[:, 0]
    return GenerationOutput(tokens, [torch.tensor(lp, dtype=torch.float32) for lp in logprobs], reasons)

