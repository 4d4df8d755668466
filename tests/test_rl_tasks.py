"""Procedural tasks, their rewards and splits, and the character tokenizer (m1model.rl.tasks)."""

from __future__ import annotations

import random

import pytest
import torch

from m1model.rl.tasks import END, AdditionTask, CharTokenizer, CountdownTask, SortingTask, make_task

TASKS = {
    "addition": lambda: AdditionTask(1, 3),
    "addition_reversed": lambda: AdditionTask(2, 2, reverse=True),
    "sorting": lambda: SortingTask(2, 5),
    "countdown": lambda: CountdownTask(3, 10),
}


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_from_seed(name):
    task = TASKS[name]()
    a = task.problems("train", 50, seed=7)
    assert a == TASKS[name]().problems("train", 50, seed=7)
    assert a != task.problems("train", 50, seed=8)
    assert task.demonstrations(20, seed=3) == task.demonstrations(20, seed=3)


@pytest.mark.parametrize("name", TASKS)
def test_train_and_eval_are_disjoint(name):
    task = TASKS[name]()
    train = task.problems("train", 2000, seed=0, unique=False)
    held_out = task.problems("eval", 200, seed=0)
    train_keys = {p.key for p in train}
    assert not train_keys & {p.key for p in held_out}
    assert len({p.key for p in held_out}) == 200                 # unique eval problems
    # Disjoint by key, not by seed: other seeds' training data avoid the same eval set.
    assert not {p.key for p in task.problems("train", 500, seed=99, unique=False)} & {p.key for p in held_out}
    # Demonstrations come from the train split.
    demo_prompts = {prompt for prompt, _ in task.demonstrations(300, seed=5)}
    assert not demo_prompts & {p.prompt for p in held_out}
    # The eval fraction is roughly what was asked (binomial sd of the fraction: 0.0067; +-0.03 is 4.5 sd).
    everything = [task.sample(random.Random(i)) for i in range(2000)]
    frac = sum(task.split_of(p) == "eval" for p in everything) / len(everything)
    assert 0.07 < frac < 0.13


@pytest.mark.parametrize("name", TASKS)
def test_demonstrations_earn_full_reward(name):
    task = TASKS[name]()
    for prompt, completion in task.demonstrations(200, seed=1):
        assert completion.endswith(END)
        assert task.accuracy_reward(prompt, completion) == 1.0
        assert task.format_reward(prompt, completion) == 1.0
        assert task.reward(prompt, completion) == pytest.approx(1.1)


def test_addition_rewards():
    task = AdditionTask(1, 3)
    assert task.reward("12+345=", "357.") == pytest.approx(1.1)
    assert task.reward("12+345=", "358.") == pytest.approx(0.1)      # well-formed, wrong
    assert task.reward("12+345=", "357") == 0.0                      # never stopped
    assert task.reward("12+345=", "357.7") == 0.0                    # text after the end marker
    assert task.reward("12+345=", "35a.") == 0.0
    assert task.reward("12+345=", ".") == 0.0                        # empty answer
    assert task.reward("12+345=", "0357.") == pytest.approx(0.1)     # not the exact answer
    assert task.accuracy_reward("999+1=", "1000.") == 1.0
    rev = AdditionTask(1, 3, reverse=True)
    assert rev.accuracy_reward("12+345=", "753.") == 1.0 and rev.accuracy_reward("12+345=", "357.") == 0.0
    assert rev.accuracy_reward("5+5=", "01.") == 1.0
    with pytest.raises(ValueError, match="not a addition prompt"):
        task.reward("12*3=", "36.")


def test_sorting_rewards():
    task = SortingTask()
    assert task.accuracy_reward("sort:5,31,9,5=", "5,5,9,31.") == 1.0
    assert task.accuracy_reward("sort:5,31,9,5=", "5,9,31.") == 0.0          # dropped a duplicate
    assert task.accuracy_reward("sort:5,31,9,5=", "31,9,5,5.") == 0.0
    assert task.format_reward("sort:5,31,9,5=", "5,,9.") == 0.0
    assert task.format_reward("sort:5,31,9,5=", "1,2.") == 1.0


def test_countdown_rewards():
    task = CountdownTask()
    prompt = "make14:2,3,4="
    for good in ("2*(3+4).", "(4+3)*2.", "4*3+2.", "2+3*4.", "(3+4)*2."):
        assert task.accuracy_reward(prompt, good) == 1.0, good
    for wrong in ("2*3+4.", "14.", "2*7.", "4*2+3*2.", "2*(3+4)+0.", "(2*(3+4)).x"):
        assert task.accuracy_reward(prompt, wrong) == 0.0, wrong
    assert task.reward(prompt, "2*3+4.") == pytest.approx(0.1)                # parses, wrong value
    assert task.format_reward(prompt, "2*(3+4.") == 0.0                        # unbalanced
    assert task.format_reward(prompt, "2**3.") == 0.0
    assert task.format_reward(prompt, "4/(2-2)*3.") == 1.0                     # well-formed, divides by 0
    assert task.accuracy_reward(prompt, "4/(2-2)*3.") == 0.0
    assert task.accuracy_reward("make2:4,2=", "4/2.") == 1.0
    assert task.accuracy_reward("make3:4,2=", "4/2.") == 0.0
    assert task.format_reward(prompt, "02+3*4.") == 0.0                        # leading zero
    assert task.format_reward(prompt, "(" * 40 + "2" + ")" * 40 + ".") == 0.0  # too long / deep


def test_countdown_targets_and_numbers_in_range():
    task = CountdownTask(num_numbers=4, max_number=9, max_target=50)
    for p in task.problems("train", 200, seed=2):
        target, nums = p.key
        assert 1 <= target <= 50 and len(nums) == 4 and all(1 <= n <= 9 for n in nums)


def test_small_space_raises():
    with pytest.raises(ValueError, match="distinct eval problems"):
        AdditionTask(1, 1).problems("eval", 100, seed=0)   # 55 unordered pairs in all


def test_bad_settings():
    with pytest.raises(ValueError, match="min_digits"):
        AdditionTask(3, 2)
    with pytest.raises(ValueError, match="eval_fraction"):
        SortingTask(eval_fraction=0.0)
    with pytest.raises(ValueError, match="unknown task 'multiply'"):
        make_task("multiply")
    with pytest.raises(ValueError, match="split must be"):
        next(AdditionTask().iter_problems("test", 0))
    assert isinstance(make_task("countdown", num_numbers=2), CountdownTask)


def test_tokenizer_round_trip_and_specials():
    tok = CharTokenizer()
    for name in TASKS:
        for prompt, completion in TASKS[name]().demonstrations(50, seed=4):
            ids = tok.encode(prompt + completion, bos=True)
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            assert tok.decode(ids) == prompt + completion
            assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode([tok.pad_id, 5, tok.eos_id, tok.pad_id]) == tok.decode([5]) + END
    with pytest.raises(ValueError, match="character 'Q' is not in the alphabet"):
        tok.encode("1+Q=")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="must not contain the end marker"):
        CharTokenizer("01.")


def test_tokenizer_batches():
    tok = CharTokenizer()
    ids, mask = tok.encode_batch(["1+2=", "10+20="])
    assert ids.shape == mask.shape == (2, 7)
    assert ids[0, :2].tolist() == [tok.pad_id] * 2 and mask[0].tolist() == [False] * 2 + [True] * 5
    assert tok.decode(ids[0]) == "1+2=" and tok.decode(ids[1]) == "10+20="
    _, rmask = tok.encode_batch(["1+2=", "10+20="], padding_side="right")
    assert rmask[0].tolist() == [True] * 5 + [False] * 2
    seq, target = tok.encode_pair("1+2=", "3.")
    assert tok.decode(seq[target]) == "3." and tok.decode(seq[~target]) == "1+2="
    assert seq.dtype == torch.int64
