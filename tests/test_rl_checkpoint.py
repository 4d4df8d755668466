"""Atomic files and checkpoints (m1model.rl.checkpoint): exact resume, crashes leave the previous one usable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from m1model.rl import checkpoint as ckpt
from m1model.rl.checkpoint import (
    CheckpointError,
    atomic_write_text,
    flatten_state,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unflatten_state,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def train_steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 6, generator=g)
        loss = model(x).square().mean() + 1e-3 * torch.rand(()).item()   # the global RNG stream matters too
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_continues_bit_exactly(tmp_path):
    """Save after 3 AdamW steps, restore into fresh objects, continue: identical to never stopping."""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.1)
    train_steps(model, opt, 3, seed=1)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    save_checkpoint(tmp_path, 3, model.state_dict(), optimizer_state=opt.state_dict(), rng=rng_state(),
                    extra={"data_position": 17, "config": {"lr": 1e-2, "algo": "cispo"}})
    train_steps(model, opt, 4, seed=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draws = (torch.rand(3), random.random(), np.random.rand())

    torch.manual_seed(999)   # disturb every RNG before resuming
    random.seed(0)
    np.random.seed(0)
    fresh = tiny_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    c = load_checkpoint(tmp_path)
    assert c.step == 3 and c.extra == {"data_position": 17, "config": {"lr": 1e-2, "algo": "cispo"}}
    fresh.load_state_dict(c.model)
    fresh_opt.load_state_dict(c.optimizer)
    set_rng_state(c.rng)
    assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.95) and fresh_opt.param_groups[0]["eps"] == 1e-15
    train_steps(fresh, fresh_opt, 4, seed=2)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert random.random() == expected_draws[1] and np.random.rand() == expected_draws[2]


def test_flatten_round_trips_types():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {"m": torch.zeros(0)}},
        "param_groups": [{"betas": (0.9, 0.95), "lr": 1e-3, "params": [0, 1], "foreach": None, "name": "x"}],
        "odd": {"__tensor__": 1, 2.5: float("inf"), "nan": float("nan"), "t": (1, [2, (3,)])},
    }
    skeleton, tensors = flatten_state(state, prefix="p/")
    json.dumps(skeleton, allow_nan=False)   # strict JSON
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.95)
    assert set(back["state"]) == {0, 1} and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["odd"]["__tensor__"] == 1 and back["odd"][2.5] == float("inf")
    assert back["odd"]["nan"] != back["odd"]["nan"]
    assert back["odd"]["t"] == (1, [2, (3,)])
    with pytest.raises(TypeError, match="cannot store a set"):
        flatten_state({"s": {1, 2}})
    with pytest.raises(TypeError, match="cannot store a dtype"):
        flatten_state({"d": torch.float32})


def test_tensor_dtypes_views_and_shared_storage(tmp_path):
    w = torch.randn(4, 4)
    model_state = {
        "bf16": torch.randn(3, 5).bfloat16(),
        "fp16": torch.randn(7).half(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False]),
        "tied_a": w,
        "tied_b": w,                       # the same tensor twice (tied weights)
        "view": w[1:3, ::2],               # a strided view into it
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    save_checkpoint(tmp_path, 0, model_state)
    c = load_checkpoint(tmp_path)
    assert c.optimizer is None and c.rng is None
    for k, v in model_state.items():
        assert c.model[k].dtype == v.dtype and torch.equal(c.model[k], v), k


def test_atomic_write_exception_leaves_old_file(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"), ckpt.atomic_path(target) as tmp:
        tmp.write_text("new, half written")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_exception_after_temp_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 10, {"w": torch.ones(3)}, extra={"tag": "old"})

    def failing_rename(src, dst):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt.os, "rename", failing_rename)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(tmp_path, 20, {"w": torch.zeros(3)}, extra={"tag": "new"})
    monkeypatch.undo()
    c = load_checkpoint(tmp_path)
    assert c.step == 10 and c.extra["tag"] == "old" and torch.equal(c.model["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000010"]    # no temp left behind

    def failing_pointer(path, obj):
        raise OSError("crash before the pointer moved (injected)")

    monkeypatch.setattr(ckpt, "atomic_write_json", failing_pointer)
    with pytest.raises(OSError, match="pointer"):
        save_checkpoint(tmp_path, 20, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).step == 10      # the renamed step-20 is not visible yet
    save_checkpoint(tmp_path, 20, {"w": torch.full((3,), 2.0)})
    assert torch.equal(load_checkpoint(tmp_path).model["w"], torch.full((3,), 2.0))


# The child writes checkpoint 1, then starts checkpoint 2 with a large tensor and
# stops at a chosen point, announcing it; the parent SIGKILLs it there.
CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from m1model.rl import checkpoint as ckpt
    directory, where = sys.argv[1], sys.argv[2]
    ckpt.save_checkpoint(directory, 1, {"w": torch.ones(8)}, extra={"tag": "first"})
    def stop(*args, **kwargs):
        print("PAUSED", flush=True)
        time.sleep(600)
    if where == "data":                  # the model file is on disk, not yet renamed into place
        ckpt.fsync_file = stop
    else:                                # the step directory is renamed, the pointer not yet replaced
        ckpt.os.replace = stop
    ckpt.save_checkpoint(directory, 2, {"w": torch.zeros(32 * 2**20 // 4)}, extra={"tag": "second"})
""")


@pytest.mark.parametrize("where", ["data", "pointer"])
def test_killed_mid_write_leaves_previous_checkpoint_usable(tmp_path, where):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), where], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"PAUSED"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    leftovers = [p for p in os.listdir(tmp_path) if p not in ("latest", "step-00000001")]
    assert leftovers    # the interrupted write did leave something behind ...
    c = load_checkpoint(tmp_path)   # ... yet the previous checkpoint loads
    assert c.step == 1 and c.extra["tag"] == "first" and torch.equal(c.model["w"], torch.ones(8))
    save_checkpoint(tmp_path, 2, {"w": torch.full((4,), 3.0)})      # and the next save cleans up
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000001", "step-00000002"]
    assert torch.equal(load_checkpoint(tmp_path).model["w"], torch.full((4,), 3.0))


def test_keep_and_resave_same_step(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"w": torch.tensor([float(step)])}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000003", "step-00000004"]
    # Resuming at step 4 and saving step 4 again writes beside it, then moves `latest`.
    path = save_checkpoint(tmp_path, 4, {"w": torch.tensor([44.0])}, keep=2)
    assert path.name == "step-00000004-1" and latest_checkpoint(tmp_path) == path
    assert load_checkpoint(tmp_path).model["w"].item() == 44.0
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000003", "step-00000004-1"]
    # Resuming from step 3 and saving step 4: the old step-4 checkpoint is stale and goes.
    (tmp_path / "latest").write_text(json.dumps({"name": "step-00000003"}))
    save_checkpoint(tmp_path, 4, {"w": torch.tensor([4.5])}, keep=3)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000003", "step-00000004"]
    assert load_checkpoint(tmp_path).model["w"].item() == 4.5


def test_missing_and_damaged(tmp_path):
    assert load_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "nowhere") is None
    path = save_checkpoint(tmp_path, 5, {"w": torch.ones(100)})
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(64)
    with pytest.raises(CheckpointError, match="bytes, expected"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text('{"name": "step-00000009"}')
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text('{"name": "../../etc"}')
    with pytest.raises(CheckpointError, match="not a step"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="step must be an int"):
        save_checkpoint(tmp_path, -1, {})
