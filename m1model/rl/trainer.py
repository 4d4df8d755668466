"""The RL trainer (DESIGN 6): an SFT warm start, then CISPO (or GRPO / DAPO) on rule-based rewards.

Objective (CISPO, MiniMax-M1, arXiv 2506.13585), maximised at every optimiser step:

    J = 1/N * sum_i sum_t sg(clip(r_it, 1 - eps_low, 1 + eps_high)) * A_i * log pi(o_it | q, o_i,<t)

    r_it = pi(o_it) / pi_old(o_it)                    importance-sampling (IS) ratio of token t of response i
    A_i  = (R_i - mean_group R) / (std_group R + eps)  the group-normalised reward of response i
    N    = response tokens of the optimiser step's whole batch (all micro-batches, all ranks)
    sg   = stop-gradient; eps_low unbounded by default, eps_high = 4 (an IS weight cap of 5)

No KL term, no value model. How it differs from the baselines in the same loop:
- PPO / GRPO maximise min(r A, clip(r, 1 - eps, 1 + eps) A): a token whose ratio
  has left the trust region in its advantage's direction gets NO gradient. Those
  are often the rare tokens that open a new line of reasoning, and they are
  dropped again at every update. CISPO clips only the detached IS weight: every
  token keeps a gradient, bounded by the cap.
- GRPO averages each response over its own length and then over responses (a
  length bias) and adds a KL penalty to a reference model (left out here, for all
  three); CISPO and DAPO weight every token of the batch equally.
- DAPO keeps PPO's clipped min with a wider upper clip (0.2 / 0.28) and refills
  the batch with informative groups (dynamic sampling).

One step of `train`:
  1. P prompts from the task's train split, G rollouts each with model.generate
     (fp32 head log-probs, repetition stop). Every row samples with its own
     generator seeded from (seed, step, row), so splitting the rows over
     data-parallel ranks or resuming from a checkpoint does not change them.
  2. Rewards from pluggable callables reward(prompt, completion) -> float; group
     advantages; groups whose rewards are all equal carry no signal and are dropped
     (the paper's filter; DAPO also refills them).
  3. old log-probs (below), then `updates_per_step` AdamW steps (betas 0.9 / 0.95,
     eps 1e-15, clipped gradient norm), each on its own slice of the kept rows,
     in micro-batches. Log-probs come from the training forward on packed
     sequences (cu_seqlens) through the FP32 head. Every micro-batch's loss is
     divided by its slice's GLOBAL token count, so the gradient does not depend on
     the micro-batch size or the number of ranks.
  4. Metrics (DIR/metrics.jsonl), held-out greedy evaluation, atomic checkpoints.

old_logp. Default "recompute": a no-grad training forward before the first
update of each rollout batch, on the same micro-batches. The IS ratio then
measures only how far the updates have moved the policy (exactly 1 on the first
update), and the train/inference mismatch stays out of it and is measured on
its own: prob_corr is the Pearson correlation of the rollout's token
probabilities (generate: cached decode kernels) with this forward's (packed
prefill kernels), both through the FP32 head -- the paper's check (0.987 with a
bf16 head, 0.997 with fp32). "rollout" uses generate's log-probs as old_logp
instead: one forward less, and the ratio then also corrects the mismatch;
prob_corr then comes from the first update's forward, whose parameters are
still the rollout's.

Data parallel (torchrun): prompts are split over ranks for the rollouts, the
rollouts are all-gathered (a few hundred small integer lists), every rank
derives the same kept rows and slices, trains on its share of each slice under
DDP (which averages gradients, so losses are scaled by the world size), and the
optimiser steps stay identical on every rank.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m1model.config import FULL, LINEAR, M1Config
from m1model.model import M1ForCausalLM
from m1model.rl import parallel
from m1model.rl.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from m1model.rl.losses import (
    CISPO_EPS_HIGH,
    DAPO_EPS_HIGH,
    DAPO_EPS_LOW,
    GRPO_EPS,
    LossStats,
    cispo_loss,
    cispo_stats,
    dapo_loss,
    group_advantages,
    grpo_loss,
    ppo_clip_stats,
    zero_variance_groups,
)
from m1model.rl.metrics import MetricsWriter
from m1model.rl.rollout import Rollouts, pack, response_logprobs, row_seed, sample_rollouts
from m1model.rl.tasks import CharTokenizer, Task, make_task

ALGOS = ("cispo", "grpo", "dapo")
OLD_LOGP = ("recompute", "rollout")
# Metrics that measure wall time: they differ between otherwise identical runs.
TIMING_KEYS = ("tokens_per_s", "rollout_s", "update_s", "eval_s", "step_s", "sft_s", "elapsed_s")
# Fields that do not change what is computed: a resumed run may change them.
# Metrics of the policy update: null on a step without one (every group filtered out).
UPDATE_KEYS = ("loss", "clip_frac", "masked_frac", "is_ratio_mean", "is_ratio_max", "is_ratio_min", "entropy",
               "prob_corr", "grad_norm", "grad_norm_max", "updates", "trained_tokens")
RUNTIME_FIELDS = ("steps", "out", "resume", "progress", "threads", "save_every", "keep_checkpoints", "eval_every")


class RunDirError(RuntimeError):
    """--out holds another run (or a run with other settings than --resume was given)."""


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- run
    task: str = _f("addition", "built-in task: addition, sorting or countdown")
    algo: str = _f("cispo", "cispo, grpo or dapo")
    steps: int = _f(250, "RL steps (one rollout batch and `updates_per_step` optimiser steps each)")
    seed: int = _f(0, "seed of the initial weights, the data order and every sampling generator")
    out: str = _f("runs/m1-rl", "run directory: metrics.jsonl, checkpoints/, reward.png")
    resume: bool = _f(False, "continue from the latest checkpoint in --out")
    # --- task
    min_digits: int = _f(2, "addition: fewest digits of an operand")
    max_digits: int = _f(2, "addition: most digits of an operand")
    reverse: bool = _f(False, "addition: write the sum least significant digit first")
    # --- model: a tiny M1 (lightning and softmax layers, MoE in every layer), vocab of the char tokenizer
    hidden_size: int = _f(128, "model width D")
    layers: int = _f(4, "decoder layers")
    softmax_every: int = _f(4, "layer l is softmax attention when (l + 1) % softmax_every == 0, else lightning")
    heads: int = _f(4, "attention heads")
    kv_heads: int = _f(2, "KV heads of the softmax layers")
    head_dim: int = _f(32, "per-head dim")
    experts: int = _f(4, "experts per MoE layer")
    experts_per_token: int = _f(2, "top-k routing")
    expert_size: int = _f(128, "FFN width of one expert")
    block_size: int = _f(16, "lightning attention block")
    # --- SFT warm start on task demonstrations
    sft_steps: int = _f(1000, "most supervised steps before RL (0: none)")
    sft_batch_size: int = _f(128, "demonstrations per supervised step")
    sft_lr: float = _f(1e-3, "AdamW peak learning rate of the warm start")
    sft_target_loss: float = _f(0.3, "stop the warm start early once the mean loss of its last 10 steps is at "
                                      "most this (0: always run sft_steps)")
    sft_warmup: int = _f(40, "warm-start steps of linear learning-rate warmup")
    sft_final_lr_frac: float = _f(1.0, "warm-start learning rate at the last step, as a fraction of sft_lr "
                                       "(cosine decay after the warmup; 1: constant)")
    # --- RL
    prompts_per_step: int = _f(128, "P: prompts per rollout batch")
    group_size: int = _f(8, "G: responses sampled per prompt")
    updates_per_step: int = _f(2, "optimiser steps per rollout batch, each on its own slice (paper: 16)")
    micro_batch_size: int = _f(512, "responses per forward/backward (gradient accumulation)")
    lr: float = _f(2e-4, "AdamW learning rate of RL")
    warmup: int = _f(20, "RL optimiser steps of linear learning-rate warmup (a fresh Adam's first steps move "
                         "every weight by the full lr)")
    decay_steps: int = _f(250, "RL steps over which the learning rate decays linearly from lr to final_lr_frac * lr "
                               "(0: constant; a fixed horizon, not --steps, so a resumed run that goes further "
                               "keeps the same schedule)")
    final_lr_frac: float = _f(0.1, "learning rate after decay_steps, as a fraction of lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "max global gradient norm")
    temperature: float = _f(1.0, "sampling temperature of the rollouts (log-probs use the same)")
    max_new_tokens: int = _f(8, "longest response")
    eps_low: float | None = _f(None, "lower clip: 1 - eps_low (default: none for cispo, 0.2 for grpo/dapo)")
    eps_high: float | None = _f(None, "upper clip: 1 + eps_high (default: 4 for cispo, 0.28 for dapo; grpo's "
                                      "symmetric eps, default 0.2)")
    old_logp: str = _f("recompute", "recompute (training forward before the first update) or rollout")
    filter_groups: bool | None = _f(None, "drop zero-variance groups (default: on for cispo and dapo, off for grpo)")
    sampling_rounds: int | None = _f(None, "dynamic sampling: most rollout rounds to fill P informative "
                                           "groups (default: 3 for dapo, else 1)")
    repetition_window: int = _f(3000, "repetition stop: this many consecutive tokens ...")
    repetition_prob: float = _f(0.99, "... each with probability above this")
    # --- evaluation and checkpoints
    eval_problems: int = _f(300, "held-out problems (eval split) scored greedily (2-digit addition has about "
                                 "400 distinct held-out pairs)")
    eval_every: int = _f(25, "evaluate every this many steps (and at the end)")
    eval_seed: int = _f(0, "which held-out problems (the same for every training seed)")
    save_every: int = _f(50, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept on disk")
    # --- runtime
    threads: int = _f(1, "torch threads per process (tiny models: more threads only add synchronisation)")
    progress: bool = _f(True, "progress bar")

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"TrainConfig.algo must be one of {ALGOS}, got {self.algo!r}")
        if self.old_logp not in OLD_LOGP:
            raise ValueError(f"TrainConfig.old_logp must be one of {OLD_LOGP}, got {self.old_logp!r}")
        for name in ("steps", "sft_steps", "sft_warmup", "sft_target_loss", "eval_problems", "decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prompts_per_step", "group_size", "updates_per_step", "micro_batch_size", "sft_batch_size",
                     "max_new_tokens", "eval_every", "save_every", "keep_checkpoints", "threads", "layers",
                     "softmax_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("final_lr_frac", "sft_final_lr_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError("TrainConfig.group_size must be >= 2: group advantages need two responses to compare")

    # -- algorithm defaults

    @property
    def clip_range(self) -> tuple[float | None, float | None]:
        """(eps_low, eps_high) with the algorithm's defaults filled in."""
        if self.algo == "grpo":   # one symmetric eps: eps_high
            eps = GRPO_EPS if self.eps_high is None else self.eps_high
            return eps, eps
        lo, hi = (None, CISPO_EPS_HIGH) if self.algo == "cispo" else (DAPO_EPS_LOW, DAPO_EPS_HIGH)
        return (lo if self.eps_low is None else self.eps_low), (hi if self.eps_high is None else self.eps_high)

    @property
    def filters_groups(self) -> bool:
        return self.algo != "grpo" if self.filter_groups is None else self.filter_groups

    @property
    def max_sampling_rounds(self) -> int:
        return (3 if self.algo == "dapo" else 1) if self.sampling_rounds is None else self.sampling_rounds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self, tokenizer: CharTokenizer) -> M1Config:
        """A tiny M1: lightning layers with a softmax layer every `softmax_every`, MoE everywhere, post-norm."""
        types = tuple(FULL if (i + 1) % self.softmax_every == 0 else LINEAR for i in range(self.layers))
        alpha = (2 * self.layers) ** 0.25   # M1's residual scale (2L)^(1/4)
        return M1Config(
            vocab_size=tokenizer.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            layer_types=types, intermediate_size=self.expert_size, num_local_experts=self.experts,
            num_experts_per_tok=self.experts_per_token, rotary_dim=self.head_dim // 2, block_size=self.block_size,
            linear_attn_alpha=alpha, full_attn_alpha=alpha, mlp_alpha=alpha,
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        )

    def make_task(self) -> Task:
        if self.task == "addition":
            return make_task("addition", min_digits=self.min_digits, max_digits=self.max_digits,
                             reverse=self.reverse)
        return make_task(self.task)


# ---------------------------------------------------------------------------- pieces of the loop


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the paper's betas (0.9, 0.95) and eps 1e-15 (gradients of RL are tiny; a larger
    eps would silently shrink the update)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-15, weight_decay=weight_decay)


def rl_lr(cfg: TrainConfig, step: int) -> float:
    """The RL learning rate of RL step `step` (1-based) before warmup: linear decay over `decay_steps`."""
    if cfg.decay_steps == 0:
        return cfg.lr
    progress = min(1.0, (step - 1) / max(cfg.decay_steps - 1, 1))
    return cfg.lr * (1.0 - (1.0 - cfg.final_lr_frac) * progress)


def sft_lr_at(cfg: TrainConfig, i: int) -> float:
    """The warm start's learning rate at its step `i` (0-based): linear warmup over `sft_warmup` steps
    to `sft_lr` (reached at step sft_warmup - 1), then a cosine decay to `sft_final_lr_frac * sft_lr` at
    the last step. A fresh Adam's first steps move every weight by about the full lr whatever its gradient:
    without the warmup the start is a gamble on the seed; the decay lets the last steps settle."""
    if i < cfg.sft_warmup:
        return cfg.sft_lr * (i + 1) / cfg.sft_warmup
    progress = (i + 1 - cfg.sft_warmup) / (cfg.sft_steps - cfg.sft_warmup)
    frac = cfg.sft_final_lr_frac + (1.0 - cfg.sft_final_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.sft_lr * frac


def _set_warmup_lr(opt: torch.optim.Optimizer, lr: float, warmup: int) -> None:
    """lr * min(1, (n + 1) / warmup) for the optimiser's (n + 1)-th step; n is read from the Adam state,
    so a resumed run continues the same schedule."""
    state = opt.state.get(opt.param_groups[0]["params"][0], {})
    n = int(state["step"]) if "step" in state else 0
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (n + 1) / max(warmup, 1))


def _chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _slices(items: Sequence, n: int) -> list[list]:
    """`items` cut into min(n, len) contiguous slices of near-equal length."""
    n = min(n, len(items))
    return [list(items[k * len(items) // n:(k + 1) * len(items) // n]) for k in range(n)]


def _micro_steps(train_model, dp: parallel.DataParallel, micro_batches: list):
    """Yields every micro-batch of this rank, each inside the right DDP context; gradients accumulate.

    Under DDP gradients are all-reduced by the LAST backward only (no_sync
    before it), and every rank must take part: a rank with no micro-batch gets
    one None, for which the caller backpropagates `_zero_loss`.
    """
    todo = micro_batches or [None]
    for j, mb in enumerate(todo):
        with train_model.no_sync() if dp.enabled and j < len(todo) - 1 else nullcontext():
            yield mb


def _zero_loss(train_model, tokenizer) -> torch.Tensor:
    """0 * (a log-prob through every parameter): lets a rank without data join DDP's gradient all-reduce."""
    logp, _ = response_logprobs(train_model, pack([[tokenizer.bos_id]], [[tokenizer.eos_id]]))
    return logp.sum() * 0.0


def _pad(rows: Sequence[Sequence[float]], like: torch.Tensor) -> torch.Tensor:
    """Ragged float rows -> [R, L] like `like` (zeros beyond each row)."""
    out = torch.zeros_like(like)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=out.dtype)
    return out


class _Moments:
    """Sums for a Pearson correlation that can be all-reduced across ranks."""

    def __init__(self) -> None:
        self.s = [0.0] * 6   # n, sum x, sum y, sum xx, sum yy, sum xy

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        for i, v in enumerate((x.numel(), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())):
            self.s[i] += float(v)

    def pearson(self, dp: parallel.DataParallel) -> float | None:
        n, sx, sy, sxx, syy, sxy = dp.sum(self.s)
        vx, vy = n * sxx - sx * sx, n * syy - sy * sy
        if n < 2 or vx <= 0 or vy <= 0:
            return None
        return (n * sxy - sx * sy) / math.sqrt(vx * vy)


def _loss(cfg: TrainConfig, logp, old_logp, adv, mask, num_tokens: float, num_sequences: float) -> torch.Tensor:
    lo, hi = cfg.clip_range
    if cfg.algo == "cispo":
        return cispo_loss(logp, old_logp, adv, mask, eps_low=lo, eps_high=hi, num_tokens=num_tokens)
    if cfg.algo == "dapo":
        return dapo_loss(logp, old_logp, adv, mask, eps_low=lo, eps_high=hi, num_tokens=num_tokens)
    return grpo_loss(logp, old_logp, adv, mask, eps=hi, num_sequences=num_sequences)


def _stats(cfg: TrainConfig, logp, old_logp, adv, mask) -> LossStats:
    lo, hi = cfg.clip_range
    if cfg.algo == "cispo":
        return cispo_stats(logp, old_logp, adv, mask, eps_low=lo, eps_high=hi)
    return ppo_clip_stats(logp, old_logp, adv, mask, eps_low=lo, eps_high=hi)


def sft_warm_start(model, train_model, tokenizer, task: Task, cfg: TrainConfig, dp: parallel.DataParallel) -> dict:
    """Up to `sft_steps` AdamW steps on demonstrations from the train split: the mean NLL of the completion
    tokens (answer + END) over each batch, so a tiny model starts RL with a non-zero reward.

    With `sft_target_loss` the warm start stops once the loss (mean of the last 10 steps, on batches never
    seen before, so it tracks held-out skill) reaches the target: when a tiny model learns to carry varies
    a lot with the seed (one seed at 400 steps, another past 500), and a fixed step count would start RL
    from very different places; a target loss starts every seed at about the same competence."""
    if cfg.sft_steps == 0:
        return {"sft_loss": None, "sft_steps_run": 0}
    demos = task.demonstrations(cfg.sft_steps * cfg.sft_batch_size, seed=cfg.seed)
    encoded = [(tokenizer.encode(p, bos=True), tokenizer.encode(c)) for p, c in demos]
    opt = make_optimizer(model, cfg.sft_lr, cfg.weight_decay)
    losses = []
    for i in range(cfg.sft_steps):
        batch = encoded[i * cfg.sft_batch_size:(i + 1) * cfg.sft_batch_size]
        num_tokens = sum(len(c) for _, c in batch)
        loss_sum = 0.0
        for rows in _micro_steps(train_model, dp, _chunks(dp.shard(batch), cfg.micro_batch_size)):
            if rows is None:
                _zero_loss(train_model, tokenizer).backward()
                continue
            logp, _ = response_logprobs(train_model, pack([p for p, _ in rows], [c for _, c in rows]))
            loss = -logp.sum() / num_tokens
            (loss * dp.world).backward()   # DDP averages gradients over ranks: undo it
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = sft_lr_at(cfg, i)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(dp.sum([loss_sum])[0])
        recent = sum(losses[-10:]) / len(losses[-10:])
        if cfg.sft_target_loss > 0 and len(losses) >= 10 and recent <= cfg.sft_target_loss:
            break
    return {"sft_loss": recent, "sft_steps_run": len(losses)}


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, problems, cfg: TrainConfig, dp: parallel.DataParallel) -> dict:
    """Greedy answers to held-out problems: accuracy, well-formed fraction, mean response length."""
    mine = dp.shard(problems)
    correct = formed = length = 0.0
    for chunk in _chunks(mine, 256):
        out = model.generate([tokenizer.encode(p.prompt, bos=True) for p in chunk],
                             max_new_tokens=cfg.max_new_tokens, temperature=0.0, eos_token_id=tokenizer.eos_id)
        for p, tokens in zip(chunk, out.tokens):
            text = tokenizer.decode(tokens)
            correct += task.accuracy_reward(p.prompt, text)
            formed += task.format_reward(p.prompt, text)
            length += len(tokens)
    n = max(len(problems), 1)
    correct, formed, length = dp.sum([correct, formed, length])
    return {"eval_accuracy": correct / n, "eval_format": formed / n, "eval_response_len": length / n}


def collect_rollouts(model, tokenizer, problems, cfg: TrainConfig, dp: parallel.DataParallel, step: int,
                     round_: int, reward_fn, accuracy_fn) -> Rollouts:
    """G rollouts of each problem; this rank samples its share of the prompts, then all ranks gather."""
    G = cfg.group_size
    index = list(range(len(problems)))
    mine = dp.shard(index)
    seeds = [row_seed(cfg.seed, step, round_, i * G + g) for i in mine for g in range(G)]
    local = sample_rollouts(
        model, tokenizer, [problems[i].prompt for i in mine], group_size=G, seeds=seeds,
        max_new_tokens=cfg.max_new_tokens, reward_fn=reward_fn, accuracy_fn=accuracy_fn,
        temperature=cfg.temperature, repetition_window=cfg.repetition_window,
        repetition_prob=cfg.repetition_prob,
    )
    return Rollouts.concat(dp.gather(local))


def sample_batch(model, tokenizer, prompts, cfg: TrainConfig, dp: parallel.DataParallel, step: int, reward_fn,
                 accuracy_fn) -> tuple[Rollouts, torch.Tensor, list[int], int]:
    """Rollouts of `prompts_per_step` prompts from the iterator `prompts`, their group advantages [N],
    and the groups to train on: those with reward variance when filtering (more rounds of prompts
    until there are `prompts_per_step` of them, up to `max_sampling_rounds`), else all.
    Returns (rollouts, advantages, kept group indices, prompts consumed)."""
    parts, kept, used = [], [], 0
    for round_ in range(cfg.max_sampling_rounds):
        problems = list(itertools.islice(prompts, cfg.prompts_per_step))
        used += len(problems)
        ro = collect_rollouts(model, tokenizer, problems, cfg, dp, step, round_, reward_fn, accuracy_fn)
        rewards = torch.tensor(ro.rewards, dtype=torch.float64)
        keep = ~zero_variance_groups(rewards, cfg.group_size)
        if not cfg.filters_groups:
            keep = torch.ones_like(keep)
        offset = sum(p[0].num_groups for p in parts)
        kept += [offset + g for g in keep.nonzero().flatten().tolist()]
        parts.append((ro, group_advantages(rewards, cfg.group_size)))
        if len(kept) >= cfg.prompts_per_step or not cfg.filters_groups:
            break
    return (Rollouts.concat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), kept[: cfg.prompts_per_step],
            used)


def policy_update(model, train_model, opt, tokenizer, ro: Rollouts, rows: list[int], advantages: torch.Tensor,
                  cfg: TrainConfig, dp: parallel.DataParallel, lr: float) -> dict:
    """`updates_per_step` optimiser steps (learning rate `lr`, warmed up) on the kept rows of a rollout
    batch; returns their metrics."""
    # Every rank cuts the same slices (one per optimiser step); each trains on its share of each.
    plan = []
    for rows_k in _slices(rows, cfg.updates_per_step):
        micro = _chunks(dp.shard(rows_k), cfg.micro_batch_size)
        batches = [pack([ro.prompt_ids_of(i) for i in mb], [ro.responses[i] for i in mb]) for mb in micro]
        num_tokens = sum(len(ro.responses[i]) for i in rows_k)
        plan.append((rows_k, list(zip(micro, batches)), num_tokens))

    # old log-probs, and the rollout/training probability correlation.
    corr = _Moments()
    old: dict[tuple[int, int], torch.Tensor] = {}
    for k, (_, micro, _) in enumerate(plan):
        for j, (mb, batch) in enumerate(micro):
            rollout_lp = _pad([ro.logprobs[i] for i in mb], batch.mask.float())
            if cfg.old_logp == "recompute":
                with torch.no_grad():
                    old[k, j], _ = response_logprobs(model, batch, temperature=cfg.temperature)
                corr.add(rollout_lp[batch.mask].exp(), old[k, j][batch.mask].exp())
            else:
                old[k, j] = rollout_lp

    stats, losses, grad_norms = LossStats(), [], []
    ent = [0.0, 0.0]   # entropy sum, tokens
    for k, (rows_k, micro, num_tokens) in enumerate(plan):
        loss_sum = 0.0
        for item in _micro_steps(train_model, dp, list(enumerate(micro))):
            if item is None:
                _zero_loss(train_model, tokenizer).backward()
                continue
            j, (mb, batch) = item
            logp, entropy = response_logprobs(train_model, batch, temperature=cfg.temperature)
            adv = advantages[mb].to(logp.dtype)
            loss = _loss(cfg, logp, old[k, j], adv, batch.mask, num_tokens, len(rows_k))
            (loss * dp.world).backward()   # DDP averages gradients over ranks: undo it
            loss_sum += loss.item()
            stats = stats.merge(_stats(cfg, logp.detach(), old[k, j], adv, batch.mask))
            ent[0] += float(entropy.detach()[batch.mask].double().sum())
            ent[1] += batch.num_tokens
            if k == 0 and cfg.old_logp == "rollout":   # parameters are still the rollout's
                corr.add(old[k, j][batch.mask].exp(), logp.detach()[batch.mask].exp())
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)))
        _set_warmup_lr(opt, lr, cfg.warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(dp.sum([loss_sum])[0])

    stats = stats.all_reduce()
    ent_sum, ent_n = dp.sum(ent)
    return {
        "loss": sum(losses) / len(losses),
        **stats.to_dict(),
        "entropy": ent_sum / ent_n if ent_n else None,
        "prob_corr": corr.pearson(dp),
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "grad_norm_max": max(grad_norms),
        "updates": len(plan),
        "trained_tokens": sum(n for _, _, n in plan),
    }


def rollout_metrics(ro: Rollouts) -> dict:
    n = max(len(ro), 1)
    return {
        "reward_mean": sum(ro.rewards) / n,
        "accuracy": sum(ro.correct) / n,
        "response_len_mean": sum(len(r) for r in ro.responses) / n,
        "truncated_frac": sum(s == "max_new_tokens" for s in ro.stop_reasons) / n,
        "repetition_stop_frac": sum(s == "repetition" for s in ro.stop_reasons) / n,
    }


# ---------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    steps: int
    sft_eval: dict          # held-out metrics after the warm start (before RL)
    final_eval: dict        # held-out metrics at the end
    out: Path
    elapsed_s: float


def build_model(cfg: TrainConfig, tokenizer: CharTokenizer, device: torch.device) -> M1ForCausalLM:
    model = M1ForCausalLM(cfg.model_config(tokenizer))
    model.init_weights(generator=torch.Generator().manual_seed(row_seed("init", cfg.seed)))
    return model.to(device)


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    mine = cfg.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {mine[k]!r}" for k in mine
            if k not in RUNTIME_FIELDS and saved.get(k) != mine[k]]
    if diff:
        raise RunDirError("--resume: the run in --out was trained with other settings:\n  " + "\n  ".join(diff))


def train(
    cfg: TrainConfig,
    *,
    reward_fn: Callable[[str, str], float] | None = None,
    accuracy_fn: Callable[[str, str], float] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """SFT warm start, then `cfg.steps` RL steps; resumable. See the module docstring.

    reward_fn / accuracy_fn: reward(prompt, completion) -> float callables; default
    the task's reward (exact answer + 0.1 format) and accuracy. Runs under torchrun
    as well (one process per rank; rank 0 writes the files).
    """
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    dp = parallel.init()
    device = torch.device("cpu")
    task, tokenizer = cfg.make_task(), CharTokenizer()
    reward_fn = reward_fn or task.reward
    accuracy_fn = accuracy_fn or task.accuracy_reward
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"

    model = build_model(cfg, tokenizer, device)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if dp.enabled else model
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    eval_set = task.problems("eval", cfg.eval_problems, seed=cfg.eval_seed)
    prompts = task.iter_problems("train", cfg.seed)

    found = latest_checkpoint(ckpt_dir)
    if found is not None and not cfg.resume:
        raise RunDirError(f"{out} already holds a run (checkpoints in {ckpt_dir}): pass --resume to continue "
                              f"it, or choose another --out")
    if found is not None:
        ckpt = load_checkpoint(ckpt_dir)
        _check_resumable(ckpt.extra["config"], cfg)
        model.load_state_dict(ckpt.model)
        opt.load_state_dict(ckpt.optimizer)
        set_rng_state(ckpt.rng)
        start, consumed, sft_eval = ckpt.step, ckpt.extra["prompts_consumed"], ckpt.extra["sft_eval"]
        prompts = itertools.islice(prompts, consumed, None)
        writer = MetricsWriter(out / "metrics.jsonl", resume_step=start) if dp.is_main else None
        if dp.is_main:
            log(f"resumed from {ckpt.path} (step {start})")
    else:
        start, consumed = 0, 0
        writer = MetricsWriter(out / "metrics.jsonl") if dp.is_main else None
        t0 = time.perf_counter()
        sft = sft_warm_start(model, train_model, tokenizer, task, cfg, dp)
        sft_eval = evaluate(model, tokenizer, task, eval_set, cfg, dp)
        if dp.is_main:
            writer.write(0, {**sft, **sft_eval, "sft_s": time.perf_counter() - t0})

    def save(step: int, consumed: int) -> None:
        if dp.is_main:
            save_checkpoint(ckpt_dir, step, model.state_dict(), optimizer_state=opt.state_dict(), rng=rng_state(),
                            extra={"config": cfg.to_dict(), "prompts_consumed": consumed, "sft_eval": sft_eval},
                            keep=cfg.keep_checkpoints)
        dp.barrier()

    if found is None:
        save(0, consumed)
    final_eval = None
    bar = _progress(cfg, dp, start)
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        # 1-2. rollouts, rewards, advantages; zero-variance groups dropped (refilled up to max rounds).
        ro, advantages, groups, used = sample_batch(model, tokenizer, prompts, cfg, dp, step, reward_fn, accuracy_fn)
        consumed += used
        rows = [g * cfg.group_size + i for g in groups for i in range(cfg.group_size)]
        t_rollout = time.perf_counter() - t0

        # 3. policy update.
        t1 = time.perf_counter()
        lr = rl_lr(cfg, step)
        update = (policy_update(model, train_model, opt, tokenizer, ro, rows, advantages, cfg, dp, lr) if rows
                  else dict.fromkeys(UPDATE_KEYS))
        t_update = time.perf_counter() - t1

        # 4. metrics, evaluation, checkpoint.
        record = {**rollout_metrics(ro), "kept_groups": len(groups), "sampled_groups": ro.num_groups, "lr": lr,
                  **update}
        sampled_tokens = sum(len(r) for r in ro.responses)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            t2 = time.perf_counter()
            final_eval = evaluate(model, tokenizer, task, eval_set, cfg, dp)
            record.update(final_eval, eval_s=time.perf_counter() - t2)
        step_s = time.perf_counter() - t0
        record.update(tokens_per_s=sampled_tokens / step_s, rollout_s=t_rollout, update_s=t_update, step_s=step_s,
                      elapsed_s=time.perf_counter() - t_start)
        if dp.is_main:
            writer.write(step, record)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save(step, consumed)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{record['accuracy']:.2f}",
                        eval=f"{(final_eval or sft_eval)['eval_accuracy']:.2f}")
    bar.close()
    if final_eval is None:   # nothing left to train (a finished run resumed)
        final_eval = evaluate(model, tokenizer, task, eval_set, cfg, dp)
    if writer is not None:
        writer.close()
    return TrainResult(steps=cfg.steps, sft_eval=sft_eval, final_eval=final_eval, out=out,
                       elapsed_s=time.perf_counter() - t_start)


def _progress(cfg: TrainConfig, dp: parallel.DataParallel, start: int):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and dp.is_main), unit="step",
                desc=f"{cfg.algo} on {cfg.task}", dynamic_ncols=True)
