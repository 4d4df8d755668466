"""CISPO / GRPO / DAPO losses and group advantages (DESIGN 6) against formulas written here.

Shapes: B responses, T padded response length, G group size.
"""

from __future__ import annotations

import gc
import math
import statistics

import pytest
import torch

from m1model.rl.losses import (
    LossStats,
    cispo_loss,
    cispo_stats,
    dapo_loss,
    global_token_count,
    group_advantages,
    grpo_loss,
    ppo_clip_stats,
    zero_variance_groups,
)

# float64 reductions over at most a few hundred terms: the only differences
# between two algebraically equal forms are summation-order roundings, far
# below 1e-12 relative.
F64_TOL = dict(rtol=1e-12, atol=1e-14)


def random_batch(B=8, T=7, dtype=torch.float64, spread=0.6):
    """Log-probs around log(0.3), ratios exp(N(0, spread)), varied lengths, one empty response."""
    old = torch.log(torch.rand(B, T, dtype=dtype) * 0.5 + 0.05)
    logp = (old + spread * torch.randn(B, T, dtype=dtype)).requires_grad_()
    lengths = torch.randint(1, T + 1, (B,))
    lengths[B // 2] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, dtype=dtype)
    return logp, old, adv, mask


# ---------------------------------------------------------------- closed form


def hand_batch():
    """Two responses, old token probability 0.1 everywhere, ratios picked by hand.

    response 0 (A = +2): new probs 0.05, 0.2, 0.8  -> r = 0.5, 2, 8
    response 1 (A = -1): new probs 0.1, 0.01, pad  -> r = 1, 0.1, (masked)
    """
    new = torch.tensor([[0.05, 0.2, 0.8], [0.1, 0.01, 0.5]], dtype=torch.float64)
    logp = new.log().requires_grad_()
    old = torch.full((2, 3), math.log(0.1), dtype=torch.float64)
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logp, old, adv, mask


def test_cispo_closed_form_default_bounds():
    logp, old, adv, mask = hand_batch()
    # eps_high = 4 caps r = 8 at 5; no lower bound, so 0.5 and 0.1 stay.
    # J = 1/5 * [2 * (0.5 ln .05 + 2 ln .2 + 5 ln .8) - (1 ln .1 + 0.1 ln .01)]
    J = (2 * (0.5 * math.log(0.05) + 2 * math.log(0.2) + 5 * math.log(0.8))
         - (1 * math.log(0.1) + 0.1 * math.log(0.01))) / 5
    loss = cispo_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(-J, rel=1e-14)


def test_cispo_closed_form_lower_bound_and_global_count():
    logp, old, adv, mask = hand_batch()
    # eps_low = 0.2 lifts 0.5 and 0.1 to 0.8; eps_high = 1 caps 2 and 8 at 2;
    # num_tokens = 20 as if other micro-batches held 15 more tokens.
    J = (2 * (0.8 * math.log(0.05) + 2 * math.log(0.2) + 2 * math.log(0.8))
         - (1 * math.log(0.1) + 0.8 * math.log(0.01))) / 20
    loss = cispo_loss(logp, old, adv, mask, eps_low=0.2, eps_high=1.0, num_tokens=20)
    assert loss.item() == pytest.approx(-J, rel=1e-14)


def test_cispo_cap_is_one_plus_eps_high_not_eps():
    """The IS weight of a token at ratio 1.1 is 1.1 under any sane cap (the 0.2-cap bug makes it 0.2)."""
    logp = torch.tensor([[math.log(0.11)]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[math.log(0.1)]], dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    for eps_high in (0.2, 4.0):
        (grad,) = torch.autograd.grad(cispo_loss(logp, old, adv, mask, eps_high=eps_high), logp)
        assert grad.item() == pytest.approx(-1.1, rel=1e-12)


def test_grpo_closed_form():
    logp, old, adv, mask = hand_batch()
    # PPO clip at 0.2, per-response mean, then mean over the 2 responses.
    #  response 0, A=+2: min(rA, clip(r)A): r=0.5 -> 1.0; r=2 -> 1.2*2 = 2.4; r=8 -> 2.4
    #  response 1, A=-1: r=1 -> -1; r=0.1 -> min(-0.1, -0.8) = -0.8
    J = ((1.0 + 2.4 + 2.4) / 3 + (-1 - 0.8) / 2) / 2
    assert grpo_loss(logp, old, adv, mask).item() == pytest.approx(-J, rel=1e-12)


def test_dapo_closed_form():
    logp, old, adv, mask = hand_batch()
    # clip-higher [0.8, 1.28], token-level over 5 tokens:
    #  A=+2: r=0.5 -> 1.0; r=2 -> 2.56; r=8 -> 2.56;  A=-1: r=1 -> -1; r=0.1 -> -0.8
    J = (1.0 + 2.56 + 2.56 - 1 - 0.8) / 5
    assert dapo_loss(logp, old, adv, mask).item() == pytest.approx(-J, rel=1e-12)


# ---------------------------------------------------------------- gradients


def test_cispo_gradient_only_through_logp_with_detached_clipped_ratio():
    logp, old, adv, mask = random_batch(spread=1.5)
    old.requires_grad_()
    adv.requires_grad_()
    eps_low, eps_high = 0.3, 1.0
    loss = cispo_loss(logp, old, adv, mask, eps_low=eps_low, eps_high=eps_high)
    g_logp, g_old, g_adv = torch.autograd.grad(loss, [logp, old, adv], allow_unused=True)
    assert g_old is None and g_adv is None
    r = torch.exp(logp.detach() - old.detach())
    rhat = r.clamp(1 - eps_low, 1 + eps_high)
    assert ((r > 1 + eps_high) & mask).any() and ((r < 1 - eps_low) & mask).any()  # both clips exercised
    N = mask.sum()
    expected = torch.where(mask, -rhat * adv.detach()[:, None] / N, 0.0)
    torch.testing.assert_close(g_logp, expected, **F64_TOL)


def linear_softmax_policy(B, T, vocab=5, feat=4):
    """A policy with an analytic score function: logits_t = x_t W, d log pi(a_t) / dW = x_t^T (e_a - p_t)."""
    x = torch.randn(B, T, feat, dtype=torch.float64)
    W = torch.randn(feat, vocab, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, vocab, (B, T))
    return x, W, actions


def test_cispo_equals_reinforce_with_group_baseline_on_policy():
    B, T, G = 6, 5, 3
    x, W, actions = linear_softmax_policy(B, T)
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4, 1, 5, 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]

    logp = torch.log_softmax(x @ W, dim=-1).gather(-1, actions[..., None]).squeeze(-1)   # [B, T]
    adv = group_advantages(rewards, G)
    loss = cispo_loss(logp, logp.detach(), adv, mask)   # on-policy: r = 1 on every token
    (grad,) = torch.autograd.grad(loss, W)

    # REINFORCE with the group baseline, normalised by the token count:
    # grad J = 1/N sum_i (R_i - mean_g R)/std_g R * sum_t x_t^T (e_{a_t} - p_t)
    p = torch.softmax(x @ W.detach(), dim=-1)
    score = x.unsqueeze(-1) * (torch.nn.functional.one_hot(actions, 5).double() - p).unsqueeze(-2)  # [B,T,F,V]
    reinforce = torch.zeros_like(W)
    for i in range(B):
        g = rewards[(i // G) * G:(i // G + 1) * G].tolist()
        a_i = (rewards[i].item() - statistics.fmean(g)) / (statistics.pstdev(g) + 1e-6)
        reinforce += a_i * score[i][mask[i]].sum(0)
    reinforce /= mask.sum()
    torch.testing.assert_close(grad, -reinforce, **F64_TOL)


def ppo_clip_objective(logp, old, adv, mask, eps_low, eps_high):
    """PPO's clipped surrogate, token-level, written independently of m1model.rl."""
    total = 0.0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                r = torch.exp(logp[i, t] - old[i, t])
                total = total + torch.minimum(r * adv[i], torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv[i])
    return total / mask.sum()


def test_unified_mask_reproduces_ppo_clip_gradient():
    logp, old, adv, mask = random_batch(B=10, T=9, spread=0.5)
    eps_low, eps_high = 0.2, 0.28
    (ppo,) = torch.autograd.grad(-ppo_clip_objective(logp, old, adv, mask, eps_low, eps_high), logp)

    # The paper's general form with PPO's trust region as the mask and no IS clip.
    unified = cispo_loss(logp, old, adv, mask, eps_low=None, eps_high=None, unified_mask=True,
                         mask_eps_low=eps_low, mask_eps_high=eps_high)
    (grad,) = torch.autograd.grad(unified, logp)
    torch.testing.assert_close(grad, ppo, **F64_TOL)

    # The test sees every region: dropped, clipped-but-kept and inside tokens.
    r = torch.exp(logp.detach() - old)
    A = adv[:, None]
    assert (((A > 0) & (r > 1 + eps_high)) & mask).any() and (((A < 0) & (r < 1 - eps_low)) & mask).any()
    assert (((A > 0) & (r < 1 - eps_low)) & mask).any() and (((A < 0) & (r > 1 + eps_high)) & mask).any()
    # ... and plain CISPO is different (it keeps the dropped tokens).
    (cispo_grad,) = torch.autograd.grad(cispo_loss(logp, old, adv, mask), logp)
    assert not torch.allclose(cispo_grad, ppo)


def test_unified_mask_with_shared_bounds():
    """Same bounds for weight and mask: dropped tokens get 0, kept ones the clipped weight."""
    logp, old, adv, mask = random_batch(spread=0.8)
    el, eh = 0.2, 0.3
    (grad,) = torch.autograd.grad(cispo_loss(logp, old, adv, mask, eps_low=el, eps_high=eh, unified_mask=True), logp)
    r = torch.exp(logp.detach() - old)
    A = adv[:, None]
    M = ~(((A > 0) & (r > 1 + eh)) | ((A < 0) & (r < 1 - el)))
    expected = torch.where(mask & M, -r.clamp(1 - el, 1 + eh) * A / mask.sum(), 0.0)
    torch.testing.assert_close(grad, expected, **F64_TOL)


def test_dapo_and_grpo_gradients_match_ppo_clip():
    logp, old, adv, mask = random_batch(spread=0.5)
    (ppo,) = torch.autograd.grad(-ppo_clip_objective(logp, old, adv, mask, 0.2, 0.28), logp)
    (dapo,) = torch.autograd.grad(dapo_loss(logp, old, adv, mask), logp)
    torch.testing.assert_close(dapo, ppo, **F64_TOL)

    # GRPO = PPO clip averaged per response then over responses.
    obj = 0.0
    for i in range(logp.shape[0]):
        n_i = int(mask[i].sum())
        if n_i:
            obj = obj + ppo_clip_objective(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], 0.2, 0.2)
    (ppo_seq,) = torch.autograd.grad(-obj / logp.shape[0], logp)
    (grpo,) = torch.autograd.grad(grpo_loss(logp, old, adv, mask), logp)
    torch.testing.assert_close(grpo, ppo_seq, **F64_TOL)


# CISPO is not gradchecked: its stop-gradient makes the autograd gradient differ
# from the finite difference of the loss value by design (the tests above pin
# its gradient instead). GRPO and DAPO differentiate through the ratio.
@pytest.mark.parametrize("name", ["grpo", "dapo"])
def test_gradcheck(name):
    logp, old, adv, mask = random_batch(B=3, T=4, spread=0.3)
    fn = {"grpo": lambda lp: grpo_loss(lp, old, adv, mask),
          "dapo": lambda lp: dapo_loss(lp, old, adv, mask)}[name]
    # Keep ratios off the clip boundaries, where the loss is not differentiable.
    r = torch.exp(logp.detach() - old)
    for b in (0.5, 0.8, 1.2, 1.28, 1.5):
        assert ((r - b).abs() > 1e-3).all()
    assert torch.autograd.gradcheck(fn, (logp,))


# ---------------------------------------------------------------- micro-batches and ranks

LOSSES = {
    "cispo": lambda lp, o, a, m, n_tok, n_seq: cispo_loss(lp, o, a, m, eps_low=0.3, eps_high=0.5, num_tokens=n_tok),
    "cispo_unified": lambda lp, o, a, m, n_tok, n_seq: cispo_loss(lp, o, a, m, eps_low=0.3, eps_high=0.5,
                                                                  unified_mask=True, num_tokens=n_tok),
    "grpo": lambda lp, o, a, m, n_tok, n_seq: grpo_loss(lp, o, a, m, num_sequences=n_seq),
    "dapo": lambda lp, o, a, m, n_tok, n_seq: dapo_loss(lp, o, a, m, num_tokens=n_tok),
}
SPLIT = [3, 1, 4, 2]  # uneven micro-batches of a B = 10 batch


@pytest.mark.parametrize("name", LOSSES)
def test_micro_batch_split_invariance(name):
    fn = LOSSES[name]
    logp, old, adv, mask = random_batch(B=10, T=9, spread=0.8)
    full = fn(logp, old, adv, mask, None, None)
    (g_full,) = torch.autograd.grad(full, logp)

    n_tok, n_seq = global_token_count([mask]), mask.shape[0]
    total, start = 0.0, 0
    for size in SPLIT:
        sl = slice(start, start + size)
        total = total + fn(logp[sl], old[sl], adv[sl], mask[sl], n_tok, n_seq)
        start += size
    (g_split,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(total, full, **F64_TOL)
    torch.testing.assert_close(g_split, g_full, **F64_TOL)

    # Normalising each micro-batch by its own count (the gradient-accumulation bug) differs.
    naive, start = 0.0, 0
    for size in SPLIT:
        sl = slice(start, start + size)
        naive = naive + fn(logp[sl], old[sl], adv[sl], mask[sl], None, None) / len(SPLIT)
        start += size
    assert not torch.allclose(naive, full)


@pytest.mark.parametrize("name", LOSSES)
def test_data_parallel_ranks_simulated(name):
    """W ranks, each with micro-batches; DDP averages the ranks' gradients."""
    fn = LOSSES[name]
    logp, old, adv, mask = random_batch(B=12, T=6, spread=0.8)
    (g_full,) = torch.autograd.grad(fn(logp, old, adv, mask, None, None), logp)
    W = 3
    ranks = [list(range(5)), list(range(5, 7)), list(range(7, 12))]  # unequal shards
    n_tok = global_token_count([mask]) / W   # DDP divides by W: pre-multiply
    n_seq = mask.shape[0] / W
    averaged = torch.zeros_like(logp)
    for rows in ranks:
        local = torch.tensor(rows)
        lp = logp.detach()[local].requires_grad_()
        loss = 0.0
        for part in (local[: len(rows) // 2], local[len(rows) // 2:]):      # two micro-batches per rank
            idx = part - local[0]
            loss = loss + fn(lp[idx], old[part], adv[part], mask[part], n_tok, n_seq)
        (g,) = torch.autograd.grad(loss, lp)
        averaged[local] += g / W
    torch.testing.assert_close(averaged, g_full, **F64_TOL)


def _ddp_worker(rank, world, init_file, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)                       # same data and weights on every rank
    B, T, V, F = 8, 6, 5, 4
    x = torch.randn(B, T, F, dtype=torch.float64)
    actions = torch.randint(0, V, (B, T))
    old = torch.log(torch.rand(B, T, dtype=torch.float64) * 0.5 + 0.05)
    adv = torch.randn(B, dtype=torch.float64)
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    policy = torch.nn.Linear(F, V, bias=False).double()

    def logp_of(model, rows):
        return torch.log_softmax(model(x[rows]), -1).gather(-1, actions[rows, :, None]).squeeze(-1)

    def loss_of(model, rows, n_tok):
        return cispo_loss(logp_of(model, rows), old[rows], adv[rows], mask[rows], eps_low=0.3, eps_high=0.5,
                          num_tokens=n_tok)

    # Reference: one process, the whole batch.
    ref = torch.nn.Linear(F, V, bias=False).double()
    ref.load_state_dict(policy.state_dict())
    loss_of(ref, torch.arange(B), None).backward()

    ddp = torch.nn.parallel.DistributedDataParallel(policy)
    mine = torch.arange(B)[:5] if rank == 0 else torch.arange(B)[5:]   # unequal shards
    micro = [mine[:2], mine[2:]]
    n_tok = global_token_count([mask[m] for m in micro]) / world        # DDP averages gradients
    stats = LossStats()
    for j, rows in enumerate(micro):
        if j < len(micro) - 1:
            with ddp.no_sync():
                loss_of(ddp, rows, n_tok).backward()
        else:
            loss_of(ddp, rows, n_tok).backward()
        stats = stats.merge(cispo_stats(logp_of(policy, rows).detach(), old[rows], adv[rows], mask[rows],
                                        eps_low=0.3, eps_high=0.5))
    stats = stats.all_reduce()
    full_stats = cispo_stats(logp_of(ref, torch.arange(B)).detach(), old, adv, mask, eps_low=0.3, eps_high=0.5)
    count = int(global_token_count(mask[mine]).item())    # a collective: every rank calls it
    if rank == 0:
        err = (policy.weight.grad - ref.weight.grad).abs().max().item()
        scale = ref.weight.grad.abs().max().item()
        same_stats = ((stats.tokens, stats.clipped) == (full_stats.tokens, full_stats.clipped)
                      and math.isclose(stats.ratio_sum, full_stats.ratio_sum, rel_tol=1e-12)
                      and stats.ratio_max == full_stats.ratio_max)
        with open(result_file, "w") as f:
            f.write(f"{err} {scale} {int(same_stats)} {count}")
    # Tear down in order: the DDP reducer holds the process group, so a rank that
    # exits with it alive destroys gloo's threads at interpreter exit (SIGABRT).
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def test_data_parallel_gloo_two_processes(tmp_path):
    """A real 2-rank DDP run on CPU (gloo) gives the single-process full-batch gradient."""
    import time

    import torch.multiprocessing as mp

    result = tmp_path / "result.txt"
    # "spawn", not "fork": forking a process that already ran torch.compile can
    # deadlock in the child. A deadline turns a hung collective into a failure.
    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("2-rank gloo run did not finish in 300 s")
    err, scale, same_stats, count = result.read_text().split()
    assert float(scale) > 0 and float(err) <= 1e-12 * float(scale)
    assert same_stats == "1"
    assert int(count) == 6 + 1 + 3 + 5 + 2 + 6 + 4 + 1   # all-reduced count covers both shards


# ---------------------------------------------------------------- advantages


def test_group_advantages_closed_form():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1, 3.0, -1.0, 2.0, 0.5])
    adv = group_advantages(rewards, 4)
    expected = []
    for g in range(3):
        grp = rewards[4 * g:4 * g + 4].tolist()
        mu, sd = statistics.fmean(grp), statistics.pstdev(grp)
        expected += [0.0 if sd < 1e-9 else (x - mu) / (sd + 1e-6) for x in grp]
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # 1 correct out of 4: +sqrt(3) for it, -1/sqrt(3) for the others (population std sqrt(3)/4).
    assert adv[0].item() == pytest.approx(math.sqrt(3), rel=1e-5)
    assert adv[1].item() == pytest.approx(-1 / math.sqrt(3), rel=1e-5)


def test_zero_variance_groups_give_exact_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: a naive (R - mean) / (std + eps) leaves ~1e-11.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv[:6], torch.zeros(6, dtype=torch.float64))
    assert (adv[6:] != 0).all()
    assert zero_variance_groups(rewards, 3).tolist() == [True, True, False]
    # A zero-variance group contributes nothing to any loss.
    logp, old, _, mask = random_batch(B=9, T=4)
    (g,) = torch.autograd.grad(cispo_loss(logp, old, adv, mask), logp)
    assert torch.equal(g[:6], torch.zeros_like(g[:6]))


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), 0)
    with pytest.raises(TypeError, match="rewards"):
        group_advantages(torch.zeros(6, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"rewards must be \[B\]"):
        zero_variance_groups(torch.zeros(2, 3), 3)


# ---------------------------------------------------------------- masks and inputs


@pytest.mark.parametrize("name", LOSSES)
def test_mask_respected_with_garbage_padding(name):
    fn = LOSSES[name]
    logp, old, adv, mask = random_batch(B=6, T=8)
    poisoned = logp.detach().clone()
    poisoned[~mask] = float("nan")
    old_p = old.clone()
    old_p[~mask] = float("-inf")
    poisoned.requires_grad_()
    loss = fn(poisoned, old_p, adv, mask, None, None)
    (g,) = torch.autograd.grad(loss, poisoned)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))
    clean = logp.detach().clone().requires_grad_()
    ref = fn(clean, old, adv, mask, None, None)
    (g_ref,) = torch.autograd.grad(ref, clean)
    torch.testing.assert_close(loss, ref, **F64_TOL)
    torch.testing.assert_close(g, g_ref, **F64_TOL)


def test_no_tokens_gives_zero_not_nan():
    logp, old, adv, _ = random_batch(B=2, T=3)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for loss in (cispo_loss(logp, old, adv, empty), grpo_loss(logp, old, adv, empty), dapo_loss(logp, old, adv, empty)):
        assert loss.item() == 0.0


def test_float32_inputs_and_bfloat16_logp():
    logp, old, adv, mask = random_batch(dtype=torch.float32)
    assert cispo_loss(logp, old, adv, mask).dtype == torch.float32
    lp16 = logp.detach().bfloat16().requires_grad_()
    loss = cispo_loss(lp16, old, adv, mask)
    assert loss.dtype == torch.float32   # computed in fp32 whatever the input dtype
    (g,) = torch.autograd.grad(loss, lp16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_bad_inputs():
    logp, old, adv, mask = random_batch(B=3, T=4)
    with pytest.raises(ValueError, match=r"cispo_loss: old_logp must have logp's shape"):
        cispo_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match=r"cispo_loss: advantages must be \[B\] = \[3\]"):
        cispo_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match=r"grpo_loss: logp must be \[B, T\]"):
        grpo_loss(logp[0], old[0], adv, mask[0])
    with pytest.raises(TypeError, match="dapo_loss: mask must be a bool tensor"):
        dapo_loss(logp, old, adv, mask.double())
    with pytest.raises(TypeError, match="cispo_loss: logp must be a floating-point tensor"):
        cispo_loss(torch.zeros(3, 4, dtype=torch.int64), old, adv, mask)
    with pytest.raises(ValueError, match="cispo_loss: eps_high must be None or a number >= 0"):
        cispo_loss(logp, old, adv, mask, eps_high=-0.1)
    with pytest.raises(ValueError, match="cispo_loss: num_tokens must be > 0"):
        cispo_loss(logp, old, adv, mask, num_tokens=0)
    with pytest.raises(ValueError, match="grpo_loss: num_sequences must be > 0"):
        grpo_loss(logp, old, adv, mask, num_sequences=-1)


# ---------------------------------------------------------------- stats


def test_stats_closed_form_and_merge():
    logp, old, adv, mask = hand_batch()
    s = cispo_stats(logp, old, adv, mask)          # ratios 0.5, 2, 8, 1, 0.1; cap 5 clips only 8
    assert (s.tokens, s.clipped) == (5, 1)
    assert s.is_ratio_mean == pytest.approx((0.5 + 2 + 8 + 1 + 0.1) / 5, rel=1e-12)
    assert s.ratio_max == pytest.approx(8, rel=1e-12) and s.ratio_min == pytest.approx(0.1, rel=1e-12)
    # DAPO's clip is active for A>0 with r > 1.28 (2 and 8) and A<0 with r < 0.8 (0.1).
    d = ppo_clip_stats(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    assert d.clipped == 3 and d.to_dict()["clip_frac"] == pytest.approx(0.6)
    # Merged per-row stats equal the whole batch's.
    rows = [cispo_stats(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1]) for i in range(2)]
    merged = rows[0].merge(rows[1])
    assert (merged.tokens, merged.clipped, merged.ratio_max) == (s.tokens, s.clipped, s.ratio_max)
    assert merged.ratio_sum == pytest.approx(s.ratio_sum, rel=1e-14)
    assert LossStats().to_dict()["clip_frac"] == 0.0


def test_compile_fullgraph():
    logp, old, adv, mask = random_batch(dtype=torch.float32)

    def step(lp):
        return cispo_loss(lp, old, adv, mask, eps_high=0.5, unified_mask=True)

    compiled = torch.compile(step, fullgraph=True)
    (g, g_ref) = (torch.autograd.grad(f(logp), logp)[0] for f in (compiled, step))
    torch.testing.assert_close(compiled(logp), step(logp), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-7)
