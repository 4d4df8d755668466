"""Training checkpoints: safetensors for tensors, JSON for the rest, no pickle.

Files are written atomically with m1model.io (temporary file, fsync, rename,
fsync of the directory): readers see the old file or the new one, never a mix.

A checkpoint directory DIR holds complete checkpoints and a pointer:

    DIR/latest                     {"name": "step-00000100"}, replaced atomically, LAST
    DIR/step-00000100/
        model.safetensors          the model's state dict
        state.safetensors          every tensor of the optimizer state and the RNG states
        state.json                 step, the optimizer / RNG structure with tensors replaced by
                                   references into state.safetensors, extra JSON (config,
                                   data position...), file sizes

A checkpoint is written into DIR/.tmp-*, fsync-ed, renamed to its final name,
and only then does `latest` move to it. A crash at any point leaves `latest`
naming the previous, complete checkpoint; leftovers (.tmp-* directories, or a
renamed directory `latest` never pointed to) are removed by the next save.

Nothing is unpickled on load: a checkpoint from an untrusted source can at
worst hold wrong numbers.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from m1model.io import (  # noqa: F401  (atomic_path, atomic_write_text: part of this module's API)
    CheckpointError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    fsync_file,
)

FORMAT_VERSION = 1
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d{8,})(?:-(\d+))?")


# ---------------------------------------------------------------- state <-> (JSON skeleton, tensors)


def flatten_state(obj, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """Splits nested dicts / lists / tuples of tensors and scalars into (JSON skeleton, tensors).

    Tensors become {"__tensor__": key} with key = prefix + a running number;
    tuples, dicts with non-string keys and non-finite floats get tagged forms,
    so `unflatten_state` rebuilds the same types (a torch optimizer's state dict
    round-trips exactly). Anything else raises TypeError: nothing falls back to pickle.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x):
        if isinstance(x, torch.Tensor):
            key = f"{prefix}{len(tensors)}"
            tensors[key] = x
            return {"__tensor__": key}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v) for k, v in x.items()}
            return {"__dict__": [[enc(k), enc(v)] for k, v in x.items()]}
        raise TypeError(f"flatten_state: cannot store a {type(x).__name__} in a checkpoint (tensors, numbers, "
                        f"strings, None, lists, tuples and dicts only; pickle is never used)")

    return enc(obj), tensors


def unflatten_state(skeleton, tensors: Mapping[str, torch.Tensor]):
    """Inverse of `flatten_state`."""

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                try:
                    return tensors[x["__tensor__"]]
                except KeyError:
                    raise CheckpointError(f"tensor {x['__tensor__']!r} is missing from the checkpoint") from None
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            if "__float__" in x:
                return float(x["__float__"])
            if "__dict__" in x:
                return {dec(k): dec(v) for k, v in x["__dict__"]}
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(skeleton)


def _for_safetensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors, cloned where they share storage (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_checkpoint: {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if storage in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        if t.numel():
            seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[k] = t
    return out


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(_for_safetensors(tensors), str(path))
    fsync_file(path)


def _load_tensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """The RNG states a run needs to continue exactly: torch CPU (+ CUDA if initialised), random, numpy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (name, [int(k) for k in keys], int(pos), int(has_gauss), float(gauss))
    return state


def set_rng_state(state: Mapping) -> None:
    """Restores what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _as_tuples(x):
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    step: int
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict | None = None          # a torch optimizer state_dict (load_state_dict-ready)
    rng: dict | None = None                # for set_rng_state
    extra: dict = field(default_factory=dict)


def _step_dirs(directory: Path) -> list[tuple[tuple[int, int], Path]]:
    out = []
    for p in directory.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            out.append(((int(m[1]), int(m[2] or 0)), p))
    return sorted(out)


def _read_latest(directory: Path) -> str | None:
    try:
        text = (directory / LATEST).read_text()
    except FileNotFoundError:
        return None
    try:
        name = json.loads(text)["name"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{directory / LATEST} is not a checkpoint pointer: {text[:200]!r}") from None
    if not isinstance(name, str) or not _STEP_DIR.fullmatch(name):
        raise CheckpointError(f"{directory / LATEST} names {name!r}, not a step-* directory")
    return name


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The directory of the newest complete checkpoint under `directory`, or None."""
    directory = Path(directory)
    name = _read_latest(directory) if directory.is_dir() else None
    return None if name is None else directory / name


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    *,
    optimizer_state: Mapping | None = None,
    rng: Mapping | None = None,
    extra: Mapping | None = None,
    keep: int = 2,
) -> Path:
    """Writes checkpoint `step` atomically and points DIR/latest at it; keeps the newest `keep`.

    model_state: name -> tensor (a model's state_dict()); optimizer_state: a
    torch optimizer's state_dict(); rng: `rng_state()`; extra: JSON-able dict.
    Returns the new checkpoint's directory.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"save_checkpoint: step must be an int >= 0, got {step!r}")
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    current = _read_latest(directory)
    _remove_stale(directory, current, step)

    opt_skeleton, opt_tensors = flatten_state(dict(optimizer_state) if optimizer_state is not None else None,
                                              prefix="optimizer/")
    rng_skeleton, rng_tensors = flatten_state(dict(rng) if rng is not None else None, prefix="rng/")
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer": opt_skeleton,
        "rng": rng_skeleton,
        "extra": dict(extra or {}),
    }
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp-step-{step:08d}-"))
    try:
        _save_tensors(model_state, tmp / "model.safetensors")
        _save_tensors({**opt_tensors, **rng_tensors}, tmp / "state.safetensors")
        state["files"] = {name: (tmp / name).stat().st_size for name in ("model.safetensors", "state.safetensors")}
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        final = directory / f"step-{step:08d}"
        if final.exists():   # only `latest` itself can be here (stale ones were removed): re-saving a step
            n = 1 + max((k[1] for k, p in _step_dirs(directory) if k[0] == step), default=0)
            final = directory / f"step-{step:08d}-{n}"
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(directory)
    atomic_write_json(directory / LATEST, {"name": final.name, "step": step})
    dirs = _step_dirs(directory)
    superseded = [p for (s, _), p in dirs if s == step and p != final]   # an earlier save of this step
    for old in superseded + [p for _, p in dirs if p not in superseded][:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _remove_stale(directory: Path, current: str | None, step: int) -> None:
    """Removes leftovers of interrupted saves: .tmp-* entries, and step directories that
    `latest` never pointed to (steps >= the one being saved that are not `latest`)."""
    for p in directory.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for (s, _), p in _step_dirs(directory):
        if s >= step and p.name != current:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """Loads the checkpoint `latest` names in directory `path` (or `path` itself if it is a step-*
    directory). Returns None when there is no checkpoint yet; raises CheckpointError when one is
    damaged."""
    path = Path(path)
    if not _STEP_DIR.fullmatch(path.name):
        found = latest_checkpoint(path)
        if found is None:
            return None
        path = found
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} is missing")
    try:
        state = json.loads((path / "state.json").read_text())
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'} is missing or damaged: {e}") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
    for name, size in state["files"].items():
        actual = (path / name).stat().st_size if (path / name).exists() else None
        if actual != size:
            raise CheckpointError(f"{path / name}: {actual} bytes, expected {size}")
    model = _load_tensors(path / "model.safetensors", map_location)
    tensors = _load_tensors(path / "state.safetensors", "cpu")
    return Checkpoint(
        step=state["step"],
        path=path,
        model=model,
        optimizer=unflatten_state(state["optimizer"], tensors),
        rng=unflatten_state(state["rng"], tensors),
        extra=state["extra"],
    )
