"""Generation with the hybrid cache: equals a full recompute, batches like single prompts,
matches transformers' greedy generate, samples as specified, stops for the right reason."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, assert_rel_close
from model_utils import PARITY_CONFIGS, load_transformers, random_model

from m1model import HybridCache, M1Config
from m1model.generation import sample_next

TINY = M1Config.preset("tiny")


def prompts_of(lengths, vocab=TINY.vocab_size) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


def recomputed(model, prompt, generated, temperature=1.0):
    """Full-forward logits [n, V] before each generated token, and their log-probs of those tokens."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1 : -1]
    lp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, torch.tensor(generated)[:, None])[:, 0]
    return logits, lp


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "T=0.8"])
def test_cached_decoding_equals_full_recompute(temperature):
    model = random_model(TINY, seed=21)
    prompts = prompts_of([3, 17, 40])  # the longest spans 2.5 lightning blocks
    out = model.generate(prompts, max_new_tokens=25, temperature=temperature, eos_token_id=(),
                         generator=torch.Generator().manual_seed(0))
    assert out.stop_reasons == ["max_new_tokens"] * 3
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs):
        assert len(toks) == 25 and lps.dtype == torch.float32
        logits, ref_lp = recomputed(model, p, toks, temperature=temperature or 1.0)
        if temperature == 0.0:
            assert logits.argmax(-1).tolist() == toks
        # Decode steps (one-token kernels, masked SDPA over the cache) against blockwise prefill: fp32 rounding.
        assert_rel_close(lps, ref_lp, 1e-4, "log-probs")


def test_bf16_cached_decoding_no_worse_than_full_forward():
    """bf16 weights: one-token decode steps (ragged rows: masked, GQA-folded SDPA on the bf16 cache)
    against the fp32 model on the same bf16-rounded weights, compared with the bf16 full forward's
    error against the same truth: at most 2x it (both round activations to bf16 at every layer)."""
    truth_model = random_model(TINY, seed=23)
    with torch.no_grad():
        for p in truth_model.parameters():
            p.copy_(p.bfloat16().float())
    model = random_model(TINY, seed=23)
    model.load_state_dict(truth_model.state_dict())
    model = model.to(torch.bfloat16)
    prompts, steps = prompts_of([6, 35]), 12
    cont = torch.randint(0, TINY.vocab_size, (2, steps))
    cache = HybridCache(TINY, 2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        model(torch.tensor([prompts[0] + prompts[1]]), cu_seqlens=torch.tensor([0, 6, 41]), cache=cache)
        decoded = torch.stack([model(cont[:, i : i + 1], cache=cache)[:, 0] for i in range(steps)], 1)
        for n, p in enumerate(prompts):
            ids = torch.tensor([p + cont[n].tolist()])
            truth = truth_model(ids)[0, len(p) :].double()
            full = model(ids)[0, len(p) :].double()
            err_full = ((full - truth).norm() / truth.norm()).item()
            err_decode = ((decoded[n].double() - truth).norm() / truth.norm()).item()
            assert err_decode <= max(2 * err_full, 1e-3), f"sequence {n}: decode {err_decode:.2e}, full {err_full:.2e}"


def test_cache_continues_with_a_chunk():
    """Prefill ragged prompts, then feed 7 tokens per sequence at once: equals one full forward."""
    model = random_model(TINY, seed=22)
    prompts = prompts_of([9, 30])
    chunk = torch.randint(0, TINY.vocab_size, (2, 7))
    cache = HybridCache(TINY, 2, 64)
    cu = torch.tensor([0, 9, 39])
    with torch.no_grad():
        model(torch.tensor([prompts[0] + prompts[1]]), cu_seqlens=cu, cache=cache)
        assert cache.lengths.tolist() == [9, 30]
        got = model(chunk, cache=cache)
        assert cache.lengths.tolist() == [16, 37]
        for n, p in enumerate(prompts):
            full = model(torch.tensor([p + chunk[n].tolist()]))[0, len(p) :]
            assert_rel_close(got[n], full, 1e-5, f"sequence {n}")


def test_batched_generation_equals_one_at_a_time():
    model = random_model(TINY, seed=23)
    prompts = prompts_of([12, 1, 33, 7])
    batch = model.generate(prompts, max_new_tokens=15, eos_token_id=())
    for p, toks, lps in zip(prompts, batch.tokens, batch.logprobs):
        alone = model.generate([p], max_new_tokens=15, eos_token_id=())
        assert alone.tokens[0] == toks
        assert_rel_close(lps, alone.logprobs[0], 1e-5, "log-probs")


@pytest.mark.parametrize("name", ["tiny,L=4,H=4,kv=2,bs=16", "L=5,H=6,kv=3,Dh=8,bs=5,top3,alphas"])
def test_greedy_matches_transformers_generate(name, tmp_path):
    config = PARITY_CONFIGS[name]
    model = random_model(config, seed=24)
    model.save_pretrained(tmp_path)
    hf, _ = load_transformers(tmp_path)
    ids = torch.randint(0, config.vocab_size, (2, 2 * config.block_size + 3))
    out = model.generate(ids, max_new_tokens=20, eos_token_id=())
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert out.tokens == ref[:, ids.shape[1] :].tolist()


def test_sample_next_distribution():
    """Frequencies follow softmax(z/T) restricted by top-k/top-p; log-probs are of the untruncated softmax."""
    z = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0, -3.0]])
    n, T = 40000, 0.9
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(z[0] / T, -1)

    def freq(**kw):
        toks, lps = sample_next(z.expand(n, -1), temperature=T, generator=g, **kw)
        assert torch.allclose(lps, torch.log(p)[toks], atol=1e-6)
        return torch.bincount(toks, minlength=6).double() / n

    # 4 standard deviations of a frequency from n draws: 4 * sqrt(p(1-p)/n) <= 0.01.
    assert torch.allclose(freq(), p.double(), atol=0.01)
    top2 = torch.zeros(6, dtype=torch.float64)
    top2[:2] = p[:2] / p[:2].sum()
    assert torch.allclose(freq(top_k=2), top2, atol=0.01)
    # top_p: keep the smallest prefix whose mass reaches top_p.
    k = int((torch.cumsum(p, 0) < 0.8).sum()) + 1
    nucleus = torch.zeros(6, dtype=torch.float64)
    nucleus[:k] = p[:k] / p[:k].sum()
    assert torch.allclose(freq(top_p=0.8), nucleus, atol=0.01)
    greedy, lp = sample_next(z, temperature=0.0)
    assert greedy.tolist() == [0] and torch.allclose(lp, torch.log_softmax(z, -1)[:, 0])


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = random_model(TINY, seed=25)
    prompts = prompts_of([5, 11])

    def run(seed, **kw):
        return model.generate(prompts, max_new_tokens=12, temperature=1.3, eos_token_id=(),
                              generator=torch.Generator().manual_seed(seed), **kw).tokens

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0, top_k=1) == model.generate(prompts, max_new_tokens=12, eos_token_id=()).tokens


def test_one_generator_per_prompt_makes_samples_batch_independent():
    """With a generator per prompt, a prompt's continuation is the same alone or in any batch,
    even when other sequences stop early (EOS) and leave the batch."""
    model = random_model(TINY, seed=27)
    prompts = prompts_of([4, 9, 13, 2])
    seeds = [11, 12, 13, 14]

    def run(idx, eos=()):
        gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
        return model.generate([prompts[i] for i in idx], max_new_tokens=10, temperature=1.2, eos_token_id=eos,
                              generator=gens)

    together = run([0, 1, 2, 3])
    for i in range(4):
        alone = run([i])
        assert alone.tokens[0] == together.tokens[i]
        torch.testing.assert_close(alone.logprobs[0], together.logprobs[i], rtol=1e-5, atol=1e-5)
    eos = together.tokens[1][2]  # stops prompt 1 (and maybe others) early: rows leave the batch
    stopped = run([3, 1, 0], eos=eos)
    for got, i in zip(stopped.tokens, [3, 1, 0]):
        full = together.tokens[i]
        assert got == (full[: full.index(eos) + 1] if eos in full else full)
    with pytest.raises(ValueError, match="3 generators for 4 prompts"):
        model.generate(prompts, max_new_tokens=2, temperature=1.0, generator=[torch.Generator()] * 3)


def test_eos_stops_one_sequence():
    model = random_model(TINY, seed=26)
    prompts = prompts_of([6, 6])
    free = model.generate(prompts, max_new_tokens=20, eos_token_id=())
    eos = free.tokens[0][5]
    first = free.tokens[0].index(eos)
    out = model.generate(prompts, max_new_tokens=20, eos_token_id=eos)
    assert out.tokens[0] == free.tokens[0][: first + 1] and out.stop_reasons[0] == "eos"
    if eos in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1][: free.tokens[1].index(eos) + 1]
    else:
        assert out.tokens[1] == free.tokens[1] and out.stop_reasons[1] == "max_new_tokens"
    model.config.eos_token_id = eos  # the config's EOS is the default
    assert model.generate(prompts, max_new_tokens=20).tokens == out.tokens


def test_repetition_stop():
    model = random_model(TINY, seed=27)
    prompts = prompts_of([4, 9])
    # Every token has probability > 0: the window fills after exactly W tokens.
    out = model.generate(prompts, max_new_tokens=30, eos_token_id=(), repetition_window=6, repetition_prob=0.0)
    assert out.stop_reasons == ["repetition", "repetition"] and [len(t) for t in out.tokens] == [6, 6]
    # A sharpened head makes greedy tokens near-certain (p > 0.99): the paper's stop fires at W.
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)
    out = model.generate(prompts, max_new_tokens=30, eos_token_id=())
    assert out.stop_reasons == ["max_new_tokens"] * 2, "the default window (3000) is longer than the run"
    out = model.generate(prompts, max_new_tokens=30, eos_token_id=(), repetition_window=8, repetition_prob=0.99)
    assert all(r == "repetition" for r in out.stop_reasons)
    for lps in out.logprobs:
        assert len(lps) >= 8 and torch.all(lps[-8:].exp() > 0.99)


def test_on_token_streams_in_order():
    model = random_model(TINY, seed=28)
    seen: dict[int, list[int]] = {0: [], 1: []}
    out = model.generate(prompts_of([3, 8]), max_new_tokens=10, eos_token_id=(),
                         on_token=lambda i, t: seen[i].append(t))
    assert [seen[0], seen[1]] == out.tokens


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([[1, 2], []], {}, "at least one token"),
        ([[1, 2]], {"temperature": -1.0}, "temperature"),
        ([[1, 2]], {"top_p": 0.0}, "top_p"),
        ([[1, 2]], {"top_k": 0}, "top_k"),
        ([[1, 999]], {}, "prompt token ids"),
    ],
    ids=["empty prompt", "temperature", "top_p", "top_k", "token range"],
)
def test_bad_generate_arguments(prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_model(TINY).generate(prompts, max_new_tokens=3, **kwargs)


def test_cache_overflow_is_an_error():
    model = random_model(TINY)
    cache = HybridCache(TINY, 1, 4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="exceed max_length=4"):
            model(torch.tensor([[1, 2]]), cache=cache)


@pytest.mark.parametrize("device", DEVICES)
def test_device_generation_matches_cpu(device):
    """The model and its cache on `device` give the CPU model's greedy tokens and log-probs."""
    model = random_model(TINY, seed=29)
    prompts = prompts_of([7, 21])
    ref = model.generate(prompts, max_new_tokens=10, eos_token_id=())
    out = model.to(device).generate(prompts, max_new_tokens=10, eos_token_id=())
    assert out.tokens == ref.tokens
    for a, b in zip(out.logprobs, ref.logprobs):
        assert_rel_close(a, b, 1e-4, "log-probs")
