"""Policy-gradient losses for RL on verifiable rewards: CISPO, GRPO, DAPO (DESIGN 6).

Shapes: B = responses in the (micro-)batch, T = padded response length,
G = group size (responses sampled per prompt; a group is G consecutive rows).

    logp, old_logp, mask : [B, T]   log-probs of the sampled tokens under the policy
                                    being trained / the policy that sampled them
                                    (rollout, fp32 head); mask is True on response
                                    tokens (padding and prompt tokens are False)
    advantages           : [B]      one advantage per response, shared by its tokens
    rewards              : [B]

Every loss returns the scalar to MINIMISE (the negated objective). The
importance-sampling ratio is r = exp(logp - old_logp); it is always computed
without gradient, and gradient reaches the parameters only through `logp`.

Normalisation is what makes losses of micro-batches add up to the loss of the
full batch. CISPO and DAPO divide by the token count of the WHOLE batch
(`num_tokens`: all micro-batches of the optimiser step on all data-parallel
ranks); GRPO averages per sequence, then over the whole batch's sequences
(`num_sequences`). Leaving them None divides by this call's own count, which is
right only when the call sees the whole batch. Under DDP, which AVERAGES
gradients over the W ranks, pass `num_tokens = global_count / W` (or multiply
the loss by W) so the averaged gradient equals the full-batch gradient;
`global_token_count` all-reduces the count.

Statistics for logging (clip fraction, ratio mean/max) come from separate
functions, `cispo_stats` / `ppo_clip_stats`, so the losses stay pure scalar
functions that torch.compile can trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# CISPO's upper bound on the IS weight is 1 + eps_high. The paper tunes only
# eps_high and does not publish it; ScaleRL and TRL cap the IS weight near 5
# (TRL's `epsilon_high=5.0` for CISPO is the cap itself), so eps_high = 4.0
# gives the same cap of 5.0. A cap of 0.2 -- reading PPO's eps as the cap --
# would shrink every IS weight below 1 and is a known bug in other trainers;
# the weight is clipped to [1 - eps_low, 1 + eps_high], never to [.., eps].
CISPO_EPS_HIGH = 4.0
GRPO_EPS = 0.2  # PPO's symmetric clip range, as in GRPO (DeepSeekMath)
DAPO_EPS_LOW, DAPO_EPS_HIGH = 0.2, 0.28  # DAPO's clip-higher (arXiv 2503.14476)


def _check_inputs(op: str, logp, old_logp, advantages, mask) -> None:
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if logp.dim() != 2:
        raise ValueError(f"{op}: logp must be [B, T], got shape {tuple(logp.shape)}")
    if old_logp.shape != logp.shape:
        raise ValueError(f"{op}: old_logp must have logp's shape {tuple(logp.shape)}, got {tuple(old_logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"{op}: mask must have logp's shape {tuple(logp.shape)}, got {tuple(mask.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"{op}: advantages must be [B] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (True on response tokens), got {mask.dtype}")


def _check_eps(op: str, name: str, eps) -> None:
    if eps is not None and not (isinstance(eps, (int, float)) and eps >= 0 and not math.isnan(eps)):
        raise ValueError(f"{op}: {name} must be None or a number >= 0, got {eps!r}")


def _denominator(op: str, name: str, given, local: torch.Tensor) -> torch.Tensor:
    """The normaliser: `given` (global count) if passed, else this call's count; never below 1."""
    if given is None:
        return local.clamp(min=1)
    if isinstance(given, torch.Tensor):
        if given.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number or a one-element tensor, got shape {tuple(given.shape)}")
        return given.reshape(()).to(local.dtype).clamp(min=1)
    if not isinstance(given, (int, float)) or not given > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {given!r}")
    return local.new_tensor(float(given))


def _compute_dtype(logp: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logp.dtype, torch.float32)


def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """r = exp(logp - old_logp) in fp32 (fp64 for fp64 inputs), without gradient."""
    dtype = _compute_dtype(logp)
    return torch.exp(logp.detach().to(dtype) - old_logp.detach().to(dtype))


def _clip(ratio: torch.Tensor, eps_low, eps_high) -> torch.Tensor:
    lo = None if eps_low is None else 1.0 - eps_low
    hi = None if eps_high is None else 1.0 + eps_high
    return ratio if lo is None and hi is None else ratio.clamp(min=lo, max=hi)


def _trust_region_violation(ratio, adv, eps_low, eps_high) -> torch.Tensor:
    """PPO's implicit token mask, negated: True where the clipped surrogate has zero gradient.

    That is where the advantage pushes the ratio further out of the trust
    region: A > 0 and r > 1 + eps_high, or A < 0 and r < 1 - eps_low. A bound
    that is None never triggers.
    """
    out = torch.zeros_like(ratio, dtype=torch.bool)
    if eps_high is not None:
        out |= (adv > 0) & (ratio > 1.0 + eps_high)
    if eps_low is not None:
        out |= (adv < 0) & (ratio < 1.0 - eps_low)
    return out


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float | None = None,
    eps_high: float | None = CISPO_EPS_HIGH,
    unified_mask: bool = False,
    mask_eps_low: float | None = None,
    mask_eps_high: float | None = None,
    num_tokens: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clip the IS weight, keep every token's gradient.

        r    = exp(logp - old_logp)
        rhat = sg(clip(r, 1 - eps_low, 1 + eps_high))       (stop-gradient)
        loss = -1/N * sum_{i,t in mask} rhat_it * A_i * logp_it

    so d loss / d logp_it = -rhat_it * A_i / N on response tokens: no token is
    dropped, the clipped weight only bounds its size. N is the token count of the
    whole batch (`num_tokens`; None = this call's mask count). No KL term.

    Args:
        logp:       [B, T] float, log-probs under the trained policy (gradient flows here).
        old_logp:   [B, T] float, log-probs under the sampling policy (no gradient).
        advantages: [B] float, one per response (e.g. `group_advantages`; no gradient).
        mask:       [B, T] bool, True on response tokens.
        eps_low:    None (the paper's choice) means no lower bound on the IS weight.
        eps_high:   the IS weight is capped at 1 + eps_high (default 4.0: cap 5, see
                    CISPO_EPS_HIGH); None removes the cap.
        unified_mask: the paper's general form: also multiply by the token mask
                    M_it = 0 where (A_i > 0 and r_it > 1 + mask_eps_high) or
                    (A_i < 0 and r_it < 1 - mask_eps_low), else 1 -- PPO's implicit
                    trust region. With eps_low = eps_high = None and the mask bounds
                    set to PPO's clip range, the gradient is exactly PPO-clip's.
        mask_eps_low, mask_eps_high: the bounds of M; default to eps_low / eps_high.
        num_tokens: global response-token count (see the module docstring).

    Returns: scalar loss in logp's dtype promoted to at least float32.
    """
    _check_inputs("cispo_loss", logp, old_logp, advantages, mask)
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high), ("mask_eps_low", mask_eps_low),
                      ("mask_eps_high", mask_eps_high)):
        _check_eps("cispo_loss", name, eps)
    dtype = _compute_dtype(logp)
    ratio = importance_ratio(logp, old_logp)                              # [B, T]
    adv = advantages.detach().to(dtype)[:, None]                          # [B, 1]
    keep = mask
    if unified_mask:
        lo = eps_low if mask_eps_low is None else mask_eps_low
        hi = eps_high if mask_eps_high is None else mask_eps_high
        keep = keep & ~_trust_region_violation(ratio, adv, lo, hi)
    # Detached per-token weight; zero off the kept tokens BEFORE it meets logp, so
    # padding with garbage log-probs (or an infinite ratio) cannot produce NaN.
    weight = torch.where(keep, _clip(ratio, eps_low, eps_high) * adv, 0.0)
    terms = torch.where(keep, weight * logp.to(dtype), 0.0)
    denom = _denominator("cispo_loss", "num_tokens", num_tokens, mask.sum().to(dtype))
    return -terms.sum() / denom


def _ppo_clip_terms(logp, old_logp, advantages, keep, eps_low, eps_high) -> torch.Tensor:
    """Per-token PPO-clip surrogate min(r A, clip(r, 1-eps_low, 1+eps_high) A), 0 off `keep`.

    Here r = exp(logp - old_logp) carries gradient (through logp); its
    gradient is r A inside the trust region and 0 where the clip is active.
    """
    dtype = _compute_dtype(logp)
    adv = advantages.detach().to(dtype)[:, None]
    # Off `keep` the log-ratio is replaced by 0 (r = 1) so that garbage padding
    # cannot overflow exp() and leak NaN into the backward pass.
    log_ratio = torch.where(keep, logp.to(dtype) - old_logp.detach().to(dtype), 0.0)
    ratio = torch.exp(log_ratio)
    surrogate = torch.minimum(ratio * adv, _clip(ratio, eps_low, eps_high) * adv)
    return torch.where(keep, surrogate, 0.0)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = GRPO_EPS,
    num_sequences: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO (DeepSeekMath, arXiv 2402.03300) without its KL term: PPO clip, per-sequence mean.

        loss = -1/S * sum_i 1/|o_i| * sum_{t in o_i} min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i)

    S is the number of responses in the whole batch (`num_sequences`; None =
    this call's B). A response with no tokens contributes 0 (and still counts
    in S). The per-sequence mean is GRPO's length bias that DAPO and CISPO
    replace by token-level normalisation. Shapes as `cispo_loss`.
    """
    _check_inputs("grpo_loss", logp, old_logp, advantages, mask)
    _check_eps("grpo_loss", "eps", eps)
    if eps is None:
        raise ValueError("grpo_loss: eps must be a number >= 0, got None")
    terms = _ppo_clip_terms(logp, old_logp, advantages, mask, eps, eps)   # [B, T]
    lengths = mask.sum(dim=1).to(terms.dtype).clamp(min=1)               # [B]
    per_sequence = terms.sum(dim=1) / lengths                            # [B]
    denom = _denominator("grpo_loss", "num_sequences", num_sequences,
                         per_sequence.new_tensor(float(logp.shape[0])))
    return -per_sequence.sum() / denom


def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = DAPO_EPS_LOW,
    eps_high: float = DAPO_EPS_HIGH,
    num_tokens: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """DAPO (arXiv 2503.14476): PPO clip with clip-higher, token-level normalisation.

        loss = -1/N * sum_{i,t in mask} min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i)

    N as in `cispo_loss`. DAPO's dynamic sampling (drop groups whose responses
    all score the same) is the trainer's job (`zero_variance_groups`); its
    overlong reward shaping belongs to the reward. Shapes as `cispo_loss`.
    """
    _check_inputs("dapo_loss", logp, old_logp, advantages, mask)
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        _check_eps("dapo_loss", name, eps)
    terms = _ppo_clip_terms(logp, old_logp, advantages, mask, eps_low, eps_high)
    denom = _denominator("dapo_loss", "num_tokens", num_tokens, mask.sum().to(terms.dtype))
    return -terms.sum() / denom


def _check_groups(op: str, rewards: torch.Tensor, group_size: int) -> None:
    if not isinstance(rewards, torch.Tensor) or not rewards.is_floating_point():
        raise TypeError(f"{op}: rewards must be a floating-point tensor")
    if rewards.dim() != 1:
        raise ValueError(f"{op}: rewards must be [B], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{op}: group_size must be an int >= 1, got {group_size!r}")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"{op}: B = {rewards.shape[0]} rewards do not split into groups of {group_size}")


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages A_i = (R_i - mean_g R) / (std_g R + eps).

    rewards: [B] float, B = num_groups * group_size, each group G consecutive rows
    (the G responses to one prompt). std is the population std (divides by G),
    so the advantages of a group have mean 0 and mean square just under 1.
    A group whose rewards are all equal gets exactly 0 (not a rounding residue
    divided by eps). Returns [B] in rewards' dtype, without gradient.
    """
    _check_groups("group_advantages", rewards, group_size)
    r = rewards.detach().reshape(-1, group_size)                                 # [num_groups, G]
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, correction=0, keepdim=True)
    adv = centred / (std + eps)
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(constant, 0.0, adv).reshape(-1)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[num_groups] bool: True for groups whose rewards are all equal (no learning signal).

    The trainer drops these (the paper's filter, DAPO's dynamic sampling).
    """
    _check_groups("zero_variance_groups", rewards, group_size)
    r = rewards.detach().reshape(-1, group_size)
    return r.amax(dim=1) == r.amin(dim=1)


def global_token_count(masks, group=None) -> torch.Tensor:
    """Response tokens in all `masks` (the micro-batches of one optimiser step), summed over ranks.

    masks: a [B, T] bool tensor or a sequence of them. When torch.distributed is
    initialised the local count is all-reduced (SUM) over `group`. Returns a
    0-dim float64 tensor to pass as `num_tokens` (divide it by the world size
    under DDP, which averages gradients).
    """
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    device = _reduce_device(group)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for m in masks:
        count += m.sum().to(device=device, dtype=torch.float64)
    if _distributed():
        torch.distributed.all_reduce(count, group=group)
    return count


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _reduce_device(group) -> torch.device:
    """Where a collective's tensor must live: the current GPU under NCCL, else the CPU."""
    if _distributed() and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class LossStats:
    """Token statistics of the IS ratio for logging; mergeable across micro-batches and ranks.

    `clipped` counts tokens whose update the clip changed: for CISPO, tokens
    whose IS weight was clipped; for PPO-style losses, tokens whose gradient
    the clip zeroed. `masked` counts tokens CISPO's unified mask dropped.
    """

    tokens: int = 0
    clipped: int = 0
    masked: int = 0
    ratio_sum: float = 0.0
    ratio_max: float = -math.inf
    ratio_min: float = math.inf

    @property
    def clip_frac(self) -> float:
        return self.clipped / self.tokens if self.tokens else 0.0

    @property
    def is_ratio_mean(self) -> float:
        return self.ratio_sum / self.tokens if self.tokens else 1.0

    def merge(self, other: LossStats) -> LossStats:
        return LossStats(
            tokens=self.tokens + other.tokens,
            clipped=self.clipped + other.clipped,
            masked=self.masked + other.masked,
            ratio_sum=self.ratio_sum + other.ratio_sum,
            ratio_max=max(self.ratio_max, other.ratio_max),
            ratio_min=min(self.ratio_min, other.ratio_min),
        )

    def all_reduce(self, group=None) -> LossStats:
        """Combines the stats of every rank (a no-op without torch.distributed)."""
        if not _distributed():
            return self
        device = _reduce_device(group)
        sums = torch.tensor([self.tokens, self.clipped, self.masked, self.ratio_sum],
                            dtype=torch.float64, device=device)
        hi = torch.tensor([self.ratio_max], dtype=torch.float64, device=device)
        lo = torch.tensor([self.ratio_min], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX, group=group)
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN, group=group)
        tokens, clipped, masked, ratio_sum = sums.tolist()
        return LossStats(int(tokens), int(clipped), int(masked), ratio_sum, hi.item(), lo.item())

    def to_dict(self) -> dict:
        """The per-step metrics (DESIGN 6): clip_frac, is_ratio_mean, is_ratio_max (+ min, masked_frac)."""
        has = self.tokens > 0
        return {
            "clip_frac": self.clip_frac,
            "masked_frac": self.masked / self.tokens if has else 0.0,
            "is_ratio_mean": self.is_ratio_mean,
            "is_ratio_max": self.ratio_max if has else 1.0,
            "is_ratio_min": self.ratio_min if has else 1.0,
        }


def _ratio_stats(ratio: torch.Tensor, mask: torch.Tensor, clipped: torch.Tensor, masked: torch.Tensor) -> LossStats:
    r = ratio[mask].double()
    if r.numel() == 0:
        return LossStats()
    return LossStats(
        tokens=int(r.numel()),
        clipped=int((clipped & mask).sum()),
        masked=int((masked & mask).sum()),
        ratio_sum=float(r.sum()),
        ratio_max=float(r.max()),
        ratio_min=float(r.min()),
    )


@torch.no_grad()
def cispo_stats(
    logp, old_logp, advantages, mask, *, eps_low=None, eps_high=CISPO_EPS_HIGH, unified_mask=False,
    mask_eps_low=None, mask_eps_high=None,
) -> LossStats:
    """Stats matching `cispo_loss` called with the same arguments (tokens whose IS weight was clipped)."""
    _check_inputs("cispo_stats", logp, old_logp, advantages, mask)
    ratio = importance_ratio(logp, old_logp)
    adv = advantages.to(ratio.dtype)[:, None]
    clipped = _clip(ratio, eps_low, eps_high) != ratio
    masked = torch.zeros_like(mask)
    if unified_mask:
        lo = eps_low if mask_eps_low is None else mask_eps_low
        hi = eps_high if mask_eps_high is None else mask_eps_high
        masked = _trust_region_violation(ratio, adv, lo, hi)
    return _ratio_stats(ratio, mask, clipped, masked)


@torch.no_grad()
def ppo_clip_stats(logp, old_logp, advantages, mask, *, eps_low, eps_high) -> LossStats:
    """Stats for GRPO (eps_low = eps_high = eps) and DAPO: tokens where the clip zeroed the gradient."""
    _check_inputs("ppo_clip_stats", logp, old_logp, advantages, mask)
    ratio = importance_ratio(logp, old_logp)
    adv = advantages.to(ratio.dtype)[:, None]
    clipped = _trust_region_violation(ratio, adv, eps_low, eps_high)
    return _ratio_stats(ratio, mask, clipped, torch.zeros_like(mask))
