"""Rollouts and packed training batches for RL on verifiable rewards.

Shapes: P prompts, G responses per prompt (the group size), N = P * G rows (a
group is G consecutive rows), R rows of one training micro-batch, L the
longest response among them, T tokens of a packed batch.

    rollouts = sample_rollouts(model, tok, prompts, group_size=G, seeds=..., reward_fn=task.reward, ...)
    batch = pack([rollouts.prompt_ids_of(i) for i in rows], [rollouts.responses[i] for i in rows])
    logp, entropy = response_logprobs(model, batch)          # [R, L] fp32 through the FP32 head

Each row samples with its own torch.Generator (seeded by the caller, e.g. from
(seed, step, row)), so a row's response does not depend on which other rows
share its generate call: splitting rollouts across data-parallel ranks or
batches leaves them unchanged.

A packed batch lays the rows end to end, [1, T] with cu_seqlens [R+1] (the
model's varlen layout: no padding anywhere). Row i contributes its prompt and
all but the last response token; the log-prob of response token j is read at
packed position start_i + len(prompt_i) - 1 + j, where the model predicts it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


def row_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, e.g. row_seed(seed, step, row); stable across runs and hosts."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass
class Rollouts:
    """G sampled responses to each of P prompts, with their rewards. Plain Python data (cheap to gather)."""

    group_size: int
    prompts: list[str] = field(default_factory=list)           # [P] prompt texts
    prompt_ids: list[list[int]] = field(default_factory=list)  # [P] prompt token ids (bos first)
    responses: list[list[int]] = field(default_factory=list)   # [N] generated ids (EOS included when reached)
    logprobs: list[list[float]] = field(default_factory=list)  # [N] rollout log-prob of every generated token
    stop_reasons: list[str] = field(default_factory=list)      # [N] "eos" | "max_new_tokens" | "repetition"
    rewards: list[float] = field(default_factory=list)         # [N] reward_fn(prompt, completion)
    correct: list[float] = field(default_factory=list)         # [N] accuracy_fn(prompt, completion)

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def num_groups(self) -> int:
        return len(self.prompts)

    def prompt_ids_of(self, row: int) -> list[int]:
        return self.prompt_ids[row // self.group_size]

    @staticmethod
    def concat(parts: Sequence[Rollouts]) -> Rollouts:
        """The rows of `parts` in order (e.g. the shards of every rank, in rank order)."""
        if not parts:
            raise ValueError("Rollouts.concat: nothing to concatenate")
        G = parts[0].group_size
        if any(p.group_size != G for p in parts):
            raise ValueError("Rollouts.concat: parts have different group sizes")
        out = Rollouts(G)
        for p in parts:
            for name in ("prompts", "prompt_ids", "responses", "logprobs", "stop_reasons", "rewards", "correct"):
                getattr(out, name).extend(getattr(p, name))
        return out


@torch.no_grad()
def sample_rollouts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    group_size: int,
    seeds: Sequence[int],
    max_new_tokens: int,
    reward_fn: Callable[[str, str], float],
    accuracy_fn: Callable[[str, str], float] | None = None,
    temperature: float = 1.0,
    top_p: float | None = None,
    repetition_window: int = 3000,
    repetition_prob: float = 0.99,
) -> Rollouts:
    """G responses per prompt with model.generate, scored by reward_fn(prompt, completion text).

    seeds: [P * G] one seed per row (row i answers prompt i // G). The log-probs
    are generate's: fp32 head, under softmax(logits / temperature) before top-p.
    accuracy_fn (optional) is logged as `correct`; it defaults to reward_fn. A
    callable with a `many(prompts, completions)` method is called once per batch.
    """
    G = group_size
    if G < 1:
        raise ValueError(f"sample_rollouts: group_size must be >= 1, got {G}")
    if len(seeds) != len(prompts) * G:
        raise ValueError(f"sample_rollouts: need {len(prompts) * G} seeds (one per row), got {len(seeds)}")
    out = Rollouts(G, prompts=list(prompts), prompt_ids=[tokenizer.encode(p, bos=True) for p in prompts])
    if not prompts:
        return out
    device = model.device
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    gen = model.generate([ids for ids in out.prompt_ids for _ in range(G)], max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, eos_token_id=tokenizer.eos_id, generator=generators,
                         repetition_window=repetition_window, repetition_prob=repetition_prob)
    out.responses = [list(t) for t in gen.tokens]
    out.logprobs = [lp.tolist() for lp in gen.logprobs]
    out.stop_reasons = list(gen.stop_reasons)
    prompts_per_row = [out.prompts[i // G] for i in range(len(out.responses))]
    completions = [tokenizer.decode(t) for t in out.responses]
    out.rewards = _score(reward_fn, prompts_per_row, completions)
    out.correct = out.rewards if accuracy_fn is None else _score(accuracy_fn, prompts_per_row, completions)
    return out


def _score(fn, prompts: list[str], completions: list[str]) -> list[float]:
    """fn(prompt, completion) for every pair; through fn.many(prompts, completions) when fn has it
    (e.g. m1model.rl.sandbox.PythonFunctionReward, which runs its sandboxes in parallel)."""
    many = getattr(fn, "many", None)
    scores = many(prompts, completions) if callable(many) else [fn(p, c) for p, c in zip(prompts, completions)]
    return [float(s) for s in scores]


@dataclass
class PackedBatch:
    """Rows laid end to end for one training forward (see the module docstring)."""

    input_ids: torch.Tensor   # [1, T] int64
    targets: torch.Tensor     # [1, T] int64: the next token at response positions, IGNORE_INDEX elsewhere
    cu_seqlens: torch.Tensor  # [R+1] int64
    index: torch.Tensor       # [R, L] int64 packed position predicting each response token (0 where masked)
    mask: torch.Tensor        # [R, L] bool, True on response tokens

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], device=None) -> PackedBatch:
    """Packs rows (prompt i followed by response i) into one varlen batch.

    Every prompt needs >= 1 token; a response may be empty (its row then has
    no response token and contributes only its prompt).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"pack: {len(prompts)} prompts but {len(responses)} responses")
    ids, targets, lengths = [], [], []
    L = max((len(r) for r in responses), default=0)
    index = torch.zeros(len(prompts), L, dtype=torch.int64)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    start = 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p) == 0:
            raise ValueError(f"pack: prompt {i} is empty (the first response token needs a prompt token)")
        seq = list(p) + list(r)
        n = len(seq) - 1 if r else len(seq)      # the last token predicts nothing we train on
        ids.extend(seq[:n])
        targets.extend([IGNORE_INDEX] * (len(p) - 1) + list(r) + [IGNORE_INDEX] * (n - len(p) + 1 - len(r)))
        if r:
            index[i, : len(r)] = torch.arange(len(r)) + start + len(p) - 1
            mask[i, : len(r)] = True
        lengths.append(n)
        start += n
    cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device)[None],
        targets=torch.tensor(targets, dtype=torch.int64, device=device)[None],
        cu_seqlens=cu.to(device),
        index=index.to(device),
        mask=mask.to(device),
    )


def response_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies [R, L] fp32 of the response tokens (0 where masked), from one packed forward.

    `model` is an M1ForCausalLM or a wrapper whose forward takes the same arguments (DDP).
    Differentiable in the model's parameters.
    """
    logp, entropy = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, targets=batch.targets,
                          temperature=temperature, ignore_index=IGNORE_INDEX, return_entropy=True)
    zero = logp.new_zeros(())
    return (torch.where(batch.mask, logp[0][batch.index], zero),
            torch.where(batch.mask, entropy[0][batch.index], zero))
