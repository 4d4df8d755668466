"""Rollouts and packed training batches (m1model.rl.rollout): the packed training forward gives
each response token's log-prob as a per-row forward does, rollouts do not depend on their batch,
and the rollout (generate) and training (packed forward) log-probs agree through the FP32 head."""

from __future__ import annotations

import pytest
import torch
from model_utils import random_model

from m1model import M1Config
from m1model.config import FULL, LINEAR
from m1model.rl.metrics import prob_corr
from m1model.rl.rollout import IGNORE_INDEX, Rollouts, pack, response_logprobs, row_seed, sample_rollouts
from m1model.rl.tasks import CharTokenizer, make_task

TOK = CharTokenizer()
# Both attention kinds, MoE, blocks shorter than the sequences, the char tokenizer's vocab.
CONFIG = M1Config(vocab_size=TOK.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, layer_types=(LINEAR, FULL), intermediate_size=32,
                  num_local_experts=3, num_experts_per_tok=2, rotary_dim=8, block_size=4,
                  eos_token_id=TOK.eos_id)


def per_row_logprobs(model, prompt, response, temperature=1.0):
    """Reference: one dense forward of prompt + response, log-probs of the response tokens [len(response)]."""
    seq = torch.tensor([prompt + response])
    logits = model(seq)[0, len(prompt) - 1: -1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_pack_layout():
    batch = pack([[1, 5, 6], [1, 7], [1, 8, 9, 10]], [[11, 12], [], [13]])
    # row 0: 1 5 6 11 (12 is never an input); row 1: 1 7; row 2: 1 8 9 10
    assert batch.input_ids.tolist() == [[1, 5, 6, 11, 1, 7, 1, 8, 9, 10]]
    assert batch.cu_seqlens.tolist() == [0, 4, 6, 10]
    x = IGNORE_INDEX
    assert batch.targets.tolist() == [[x, x, 11, 12, x, x, x, x, x, 13]]
    assert batch.mask.tolist() == [[True, True], [False, False], [True, False]]
    assert batch.index[batch.mask].tolist() == [2, 3, 9]
    assert batch.num_tokens == 3
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        pack([[]], [[3]])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        pack([[1], [1]], [[3]])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logprobs_and_gradients_equal_per_row_forwards(temperature):
    """Ragged rows (an empty response, rows longer than a lightning block) in one packed forward."""
    model = random_model(CONFIG, seed=3).double()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, TOK.vocab_size, (n,), generator=g).tolist() for n in (5, 1, 9, 3)]
    responses = [torch.randint(2, TOK.vocab_size, (n,), generator=g).tolist() for n in (7, 3, 0, 11)]
    batch = pack(prompts, responses)
    logp, entropy = response_logprobs(model, batch, temperature=temperature)
    assert logp.shape == (4, 11) and logp.dtype == torch.float64
    assert (logp[~batch.mask] == 0).all() and (entropy[~batch.mask] == 0).all()
    assert (entropy[batch.mask] > 0).all()
    weights = torch.randn(logp.shape, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((logp * weights).sum(), list(model.parameters()))
    ref_loss = 0.0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if r:
            ref = per_row_logprobs(model, p, r, temperature)
            torch.testing.assert_close(logp[i, : len(r)], ref, rtol=1e-10, atol=1e-10)
            ref_loss = ref_loss + (ref * weights[i, : len(r)]).sum()
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        # The router runs in fp32 even in a float64 model (DESIGN 5): its weight gradient is a sum
        # over tokens in fp32, whose order differs between the packed and the per-row forwards.
        tol = 1e-5 if name.endswith("mlp.gate.weight") else 1e-9
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 1e-3 * b.abs().max().item(), msg=name)


def test_rollouts_are_batch_independent_and_agree_with_the_training_forward():
    model = random_model(CONFIG, seed=4)
    task = make_task("addition", max_digits=2)
    prompts = [p.prompt for p in task.problems("train", 5, seed=1)]
    G = 3
    seeds = [row_seed(7, 0, i) for i in range(len(prompts) * G)]
    kw = dict(group_size=G, max_new_tokens=6, reward_fn=task.reward, accuracy_fn=task.accuracy_reward)
    full = sample_rollouts(model, TOK, prompts, seeds=seeds, **kw)
    assert len(full) == 15 and full.num_groups == 5 and full.prompts == prompts
    assert all(len(lp) == len(r) for lp, r in zip(full.logprobs, full.responses))
    for r, reason in zip(full.responses, full.stop_reasons):
        assert reason == ("eos" if r[-1] == TOK.eos_id else "max_new_tokens")
    for i, r in enumerate(full.responses):
        p, completion = full.prompts[i // G], TOK.decode(r)
        assert full.rewards[i] == task.reward(p, completion)
        assert full.correct[i] == task.accuracy_reward(p, completion)
    # Two shards (as two ranks would sample them) concatenate to the same rollouts.
    shards = [sample_rollouts(model, TOK, prompts[:2], seeds=seeds[:6], **kw),
              sample_rollouts(model, TOK, prompts[2:], seeds=seeds[6:], **kw)]
    joined = Rollouts.concat(shards)
    assert joined.responses == full.responses and joined.rewards == full.rewards
    for a, b in zip(joined.logprobs, full.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-5)
    # generate's log-probs (cached decode) against the packed training forward (prefill), fp32 head.
    rows = list(range(len(full)))
    batch = pack([full.prompt_ids_of(i) for i in rows], full.responses)
    with torch.no_grad():
        train_lp, _ = response_logprobs(model, batch)
    rollout_lp = torch.zeros_like(train_lp)
    for i, lp in enumerate(full.logprobs):
        rollout_lp[i, : len(lp)] = torch.tensor(lp)
    assert (train_lp - rollout_lp).abs()[batch.mask].max() < 1e-4
    assert prob_corr(rollout_lp, train_lp, batch.mask) > 0.9999


def test_row_seed_is_stable_and_distinct():
    assert row_seed(0, 1, 2) == row_seed(0, 1, 2)
    assert len({row_seed(0, s, r) for s in range(20) for r in range(50)}) == 1000
    assert 0 <= row_seed("x") < 2**63
    with pytest.raises(ValueError, match="one per row"):
        sample_rollouts(random_model(CONFIG), TOK, ["1+1="], group_size=2, seeds=[1], max_new_tokens=2,
                        reward_fn=lambda p, c: 0.0)


def test_batched_reward_callables_are_called_once_per_batch():
    """A reward with a many(prompts, completions) method (the sandbox reward) scores a batch at once."""

    class Batched:
        calls = []

        def __call__(self, prompt, completion):
            raise AssertionError("scored one by one")

        def many(self, prompts, completions):
            self.calls.append(len(prompts))
            return [float(len(c)) for c in completions]

    reward = Batched()
    ro = sample_rollouts(random_model(CONFIG, seed=5), TOK, ["1+2=", "3+4="], group_size=3,
                         seeds=list(range(6)), max_new_tokens=4, reward_fn=reward, temperature=1.0)
    assert reward.calls == [6]
    assert ro.rewards == [float(len(TOK.decode(r))) for r in ro.responses] == ro.correct
