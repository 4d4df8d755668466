"""The RL trainer and its CLI (m1model.rl.trainer, m1model.train): metrics and files, exact resume,
crash safety, micro-batch and data-parallel invariance, zero-variance filtering, pluggable rewards.

Runs use a very small M1 (one lightning and one softmax layer, 3 experts) and a few steps, so
what they learn is noise; the tests check the mechanics, not the learning."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from m1model.rl import trainer as trainer_mod
from m1model.rl.checkpoint import latest_checkpoint, load_checkpoint
from m1model.rl.metrics import read_metrics
from m1model.rl.trainer import TIMING_KEYS, RunDirError, TrainConfig, train
from m1model.train import main

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("step", "reward_mean", "accuracy", "response_len_mean", "clip_frac", "is_ratio_mean", "is_ratio_max",
            "entropy", "prob_corr", "grad_norm", "tokens_per_s")

# min_digits=1: the mechanics tests keep the 1-2 digit addition they were written with (the demo's
# default is 2-digit operands).
TINY = dict(min_digits=1, hidden_size=32, layers=2, softmax_every=2, heads=2, kv_heads=1, head_dim=16, experts=3,
            experts_per_token=2, expert_size=32, block_size=4, sft_steps=30, sft_batch_size=8, sft_lr=3e-3,
            sft_warmup=0, sft_target_loss=0.0,
            prompts_per_step=4,
            group_size=4, updates_per_step=2, micro_batch_size=8, max_new_tokens=5, eval_problems=12,
            eval_every=2, save_every=2, lr=3e-3, warmup=1, progress=False)


def tiny(out, **over) -> TrainConfig:
    return TrainConfig(out=str(out), **{**TINY, **over})


def cli_args(cfg: TrainConfig, skip=()) -> list[str]:
    """The command line that makes `cfg` (options at their default left out, and those in `skip`)."""
    args = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None or value == f.default or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        args += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return args


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_cli_writes_metrics_plot_checkpoints_and_summary(tmp_path, capsys):
    cfg = tiny(tmp_path / "run", steps=3)
    assert main(["--task", "addition", "--algo", "cispo", "--steps", "3", "--seed", "0", "--out", cfg.out,
                 *cli_args(cfg, skip=("steps", "out"))]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "after SFT" in out and "after 3 RL steps" in out
    records = read_metrics(cfg.out)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert "sft_loss" in records[0] and "eval_accuracy" in records[0]
    for r in records[1:]:
        for key in REQUIRED:
            assert key in r, key
        assert r["tokens_per_s"] > 0 and 0 <= r["accuracy"] <= 1 and r["response_len_mean"] > 0
    assert "eval_accuracy" in records[2] and "eval_accuracy" in records[3]   # every 2 steps and at the end
    run = Path(cfg.out)
    assert (run / "reward.png").stat().st_size > 1000
    assert latest_checkpoint(run / "checkpoints").name == "step-00000003"
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.bin"))   # never pickle
    # The same --out again without --resume refuses to overwrite the run.
    assert main(cli_args(cfg)) == 2
    assert "--resume" in capsys.readouterr().err


def test_compare_runs_each_algorithm_with_the_same_seed(tmp_path, capsys):
    out = tmp_path / "cmp"
    cfg = tiny(out, steps=2, eval_every=100)
    assert main(["--compare", "cispo,grpo,dapo", *cli_args(cfg)]) == 0
    assert (out / "compare.png").stat().st_size > 1000
    runs = {a: read_metrics(out / a) for a in ("cispo", "grpo", "dapo")}
    # Same seed, same SFT: identical step 0 and identical first rollouts (DAPO may sample more).
    assert len({json.dumps(without_timing(r[:1])) for r in runs.values()}) == 1
    assert runs["cispo"][1]["reward_mean"] == runs["grpo"][1]["reward_mean"]
    with pytest.raises(SystemExit):
        main(["--compare", "cispo,ppo", "--out", str(tmp_path / "x")])


def test_resume_equals_an_uninterrupted_run(tmp_path):
    full = train(tiny(tmp_path / "full", steps=4), log=lambda s: None)
    train(tiny(tmp_path / "part", steps=2), log=lambda s: None)
    resumed = train(tiny(tmp_path / "part", steps=4, resume=True), log=lambda s: None)
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert without_timing(a) == without_timing(b)
    assert resumed.sft_eval == full.sft_eval and resumed.final_eval == full.final_eval
    wa = load_checkpoint(tmp_path / "full" / "checkpoints").model
    wb = load_checkpoint(tmp_path / "part" / "checkpoints").model
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Other settings than the checkpoint's are refused (the run would not continue the same way).
    with pytest.raises(RunDirError, match="lr"):
        train(tiny(tmp_path / "part", steps=6, resume=True, lr=1e-4), log=lambda s: None)


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    """SIGKILL in the middle of writing the step-4 checkpoint (half a safetensors file on disk):
    --resume continues from step 2 and ends exactly where an uninterrupted run does."""
    cfg = tiny(tmp_path / "run", steps=6)
    script = textwrap.dedent("""
        import os, signal, sys
        import m1model.rl.checkpoint as ckpt

        save = ckpt._save_tensors

        def crash_in_step_4(tensors, path):
            if "step-00000004" in path.parent.name and path.name == "state.safetensors":
                path.write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            save(tensors, path)

        ckpt._save_tensors = crash_in_step_4
        from m1model.train import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, *cli_args(cfg)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = Path(cfg.out) / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step-00000002"
    assert any(p.name.startswith(".tmp-step-00000004") for p in ckpts.iterdir())   # the torn write is there
    assert [r["step"] for r in read_metrics(cfg.out)][-1] == 4    # metrics went further than the checkpoint
    train(dataclasses.replace(cfg, resume=True), log=lambda s: None)
    train(tiny(tmp_path / "ref", steps=6), log=lambda s: None)
    assert without_timing(read_metrics(cfg.out)) == without_timing(read_metrics(tmp_path / "ref"))
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())


def _close(a, b, rel):
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=rel)


COMPARED = ("loss", "grad_norm", "clip_frac", "is_ratio_mean", "is_ratio_max", "entropy", "prob_corr",
            "reward_mean", "accuracy", "eval_accuracy", "sft_loss", "kept_groups")


def test_micro_batch_size_does_not_change_the_run(tmp_path):
    """The loss of every optimiser step is normalised by its global token count: one row per
    micro-batch gives the same losses, gradients and updates as the whole slice at once."""
    big = train(tiny(tmp_path / "big", steps=3, micro_batch_size=64, sft_batch_size=8), log=lambda s: None)
    small = train(tiny(tmp_path / "small", steps=3, micro_batch_size=1, sft_batch_size=8), log=lambda s: None)
    assert big.final_eval == small.final_eval
    for ra, rb in zip(read_metrics(tmp_path / "big"), read_metrics(tmp_path / "small")):
        for key in COMPARED:
            assert _close(ra.get(key), rb.get(key), 1e-4), (ra["step"], key, ra.get(key), rb.get(key))


def test_data_parallel_two_ranks_equal_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, DDP) against one process with the same global batch."""
    cfg = tiny(tmp_path / "dp", steps=3, prompts_per_step=6, micro_batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "m1model.train", *cli_args(cfg)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("held-out accuracy") == 1     # rank 0 reports
    train(dataclasses.replace(cfg, out=str(tmp_path / "one")), log=lambda s: None)
    two, one = read_metrics(cfg.out), read_metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 1, 2, 3]
    for ra, rb in zip(two, one):
        assert ra.get("trained_tokens") == rb.get("trained_tokens")
        for key in COMPARED:
            assert _close(ra.get(key), rb.get(key), 1e-4), (ra["step"], key, ra.get(key), rb.get(key))


def test_first_update_is_on_policy_and_rollout_logprobs_match_training(tmp_path):
    """old_logp = recompute: with one update per rollout batch every IS ratio is exactly 1;
    the rollout and training probabilities agree (FP32 head on both sides)."""
    train(tiny(tmp_path / "r", steps=2, updates_per_step=1), log=lambda s: None)
    for r in read_metrics(tmp_path / "r")[1:]:
        assert r["is_ratio_mean"] == 1.0 and r["is_ratio_max"] == 1.0 and r["clip_frac"] == 0.0
        assert r["prob_corr"] > 0.999
    train(tiny(tmp_path / "o", steps=2, updates_per_step=2, old_logp="rollout"), log=lambda s: None)
    for r in read_metrics(tmp_path / "o")[1:]:
        assert r["prob_corr"] > 0.999 and r["is_ratio_max"] != 1.0


def test_zero_variance_groups_are_dropped_and_rewards_are_pluggable(tmp_path):
    seen = []

    def constant(prompt, completion):
        seen.append((prompt, completion))
        return 1.0

    cfg = tiny(tmp_path / "c", steps=2, sft_steps=0)
    before = trainer_mod.build_model(cfg, trainer_mod.CharTokenizer(), torch.device("cpu")).state_dict()
    train(cfg, reward_fn=constant, log=lambda s: None)
    assert len(seen) == 2 * cfg.prompts_per_step * cfg.group_size
    for r in read_metrics(cfg.out)[1:]:
        assert r["kept_groups"] == 0 and r["reward_mean"] == 1.0 and r["loss"] is None and r["grad_norm"] is None
    after = load_checkpoint(Path(cfg.out) / "checkpoints").model
    assert all(torch.equal(before[k], after[k]) for k in before)   # nothing to learn from: no update

    # DAPO's dynamic sampling: groups of prompts whose reward varies refill the batch.
    def some_prompts(prompt, completion):
        return float(len(completion) % 2) if int(prompt.split("+")[0]) % 2 else 0.0

    train(tiny(tmp_path / "d", steps=2, algo="dapo", sampling_rounds=3), reward_fn=some_prompts,
          log=lambda s: None)
    for r in read_metrics(tmp_path / "d")[1:]:
        assert r["sampled_groups"] > 4 or r["kept_groups"] == 4
        assert r["kept_groups"] <= 4


def test_config_errors():
    with pytest.raises(ValueError, match="algo"):
        TrainConfig(algo="ppo")
    with pytest.raises(ValueError, match="group_size"):
        TrainConfig(group_size=1)
    with pytest.raises(ValueError, match="old_logp"):
        TrainConfig(old_logp="cache")
    assert TrainConfig(algo="cispo").clip_range == (None, 4.0)
    assert TrainConfig(algo="dapo").clip_range == (0.2, 0.28)
    assert TrainConfig(algo="grpo").clip_range == (0.2, 0.2)
    assert TrainConfig(algo="grpo").filters_groups is False and TrainConfig().filters_groups is True
    with pytest.raises(ValueError, match="final_lr_frac"):
        TrainConfig(final_lr_frac=1.5)
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(decay_steps=-1)
    with pytest.raises(ValueError, match="sft_final_lr_frac"):
        TrainConfig(sft_final_lr_frac=-0.1)
    with pytest.raises(ValueError, match="sft_warmup"):
        TrainConfig(sft_warmup=-1)
    with pytest.raises(ValueError, match="sft_target_loss"):
        TrainConfig(sft_target_loss=-0.1)


def test_learning_rate_decays_linearly_over_a_fixed_horizon():
    cfg = TrainConfig(lr=1e-3, decay_steps=11, final_lr_frac=0.1)
    assert trainer_mod.rl_lr(cfg, 1) == 1e-3
    assert math.isclose(trainer_mod.rl_lr(cfg, 6), 0.55e-3)
    # Past the horizon the rate stays at the floor: a run resumed with a larger --steps keeps its schedule.
    assert math.isclose(trainer_mod.rl_lr(cfg, 11), 1e-4) and math.isclose(trainer_mod.rl_lr(cfg, 500), 1e-4)
    assert trainer_mod.rl_lr(dataclasses.replace(cfg, decay_steps=0), 500) == 1e-3


def test_sft_learning_rate_warms_up_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(sft_steps=14, sft_lr=1e-3, sft_warmup=4, sft_final_lr_frac=0.1)
    lrs = [trainer_mod.sft_lr_at(cfg, i) for i in range(cfg.sft_steps)]
    assert lrs[:4] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    # The peak ends the warmup (step 3); the cosine then reaches its midpoint at step 8 and the floor last.
    assert lrs[3] == pytest.approx(1e-3) and lrs[8] == pytest.approx(0.55e-3) and lrs[13] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    constant = dataclasses.replace(cfg, sft_warmup=0, sft_final_lr_frac=1.0)
    assert [trainer_mod.sft_lr_at(constant, i) for i in range(14)] == [1e-3] * 14


def test_sft_stops_at_the_target_loss(tmp_path):
    # A target every loss meets stops after the first 10 steps (the window the loss is averaged over);
    # one no loss meets, and no target (0), run every step.
    records = {}
    for name, target in (("met", 1e9), ("unmet", 1e-9), ("none", 0.0)):
        train(tiny(tmp_path / name, steps=0, sft_target_loss=target), log=lambda s: None)
        records[name] = read_metrics(tmp_path / name)[0]
    assert records["met"]["sft_steps_run"] == 10
    assert records["unmet"]["sft_steps_run"] == records["none"]["sft_steps_run"] == TINY["sft_steps"]
    assert records["unmet"]["sft_loss"] == records["none"]["sft_loss"]
