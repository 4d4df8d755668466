"""Checkpoints: config.json + safetensors, in both MiniMax weight layouts. Never unpickles.

Tensor names (l = layer, e = expert):

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.l.{input_layernorm,post_attention_layernorm}.weight
    lightning layer: model.layers.l.self_attn.{qkv_proj,output_gate,out_proj,norm}.weight
    softmax layer:   model.layers.l.self_attn.{q_proj,k_proj,v_proj,o_proj}.weight
    MoE, fused (transformers 5):   model.layers.l.mlp.gate.weight                        [E, D]
                                   model.layers.l.mlp.experts.gate_up_proj               [E, 2F, D] gate rows first
                                   model.layers.l.mlp.experts.down_proj                  [E, D, F]
    MoE, per expert (original release, and what transformers 5 itself saves):
                                   model.layers.l.block_sparse_moe.gate.weight           [E, D]
                                   model.layers.l.block_sparse_moe.experts.e.w1.weight   [F, D] gate
                                   model.layers.l.block_sparse_moe.experts.e.w3.weight   [F, D] up
                                   model.layers.l.block_sparse_moe.experts.e.w2.weight   [D, F] down

transformers also stores four derived buffers per lightning layer
(self_attn.slope_rate [H, 1, 1], query_decay, key_decay, diagonal_decay): the
loader checks slope_rate against the config's formula and skips the rest; the
writer writes them so that transformers reports nothing missing. The original
code's self_attn.rotary_emb.inv_freq (softmax layers) is skipped too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from m1model.config import M1Config
from m1model.io import CheckpointError, atomic_path, fsync_dir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DERIVED_BUFFERS = ("slope_rate", "query_decay", "key_decay", "diagonal_decay")

_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")
_BUFFER = re.compile(r"model\.layers\.(\d+)\.self_attn\.(" + "|".join(DERIVED_BUFFERS) + ")")
_INV_FREQ = re.compile(r"model\.layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq")  # the original code's RoPE table
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _listing(title: str, names: list[str], limit: int = 40) -> str:
    shown = "\n  ".join(names[:limit])
    more = f"\n  ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{title} ({len(names)}):\n  {shown}{more}"


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the index's shards, or the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(_listing(f"{index} names shard files that do not exist", missing))
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickled weights ({', '.join(pickles)}); m1model never unpickles (a pickle can run "
            "arbitrary code). Convert them to safetensors first, e.g. with safetensors.torch.save_file."
        )
    raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors in {path}")


def _checkpoint_dtype(config_file: Path) -> torch.dtype:
    raw = json.loads(config_file.read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def load_pretrained(cls, path, *, dtype: torch.dtype | None = None, device="cpu"):
    """Builds cls(config) from a checkpoint directory without a random initialisation, then loads it."""
    path = Path(path)
    config = M1Config.from_pretrained(path)
    files = checkpoint_files(path)
    dtype = dtype or _checkpoint_dtype(path / "config.json")
    with torch.device("meta"):
        model = cls(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, files)
    return model


@torch.no_grad()
def load_weights(model, files: list[Path]) -> None:
    """Copies every tensor of `files` into `model`; every parameter must be filled exactly once."""
    config: M1Config = model.config
    params = dict(model.named_parameters())  # tied weights appear once
    E = config.num_local_experts
    filled: set[str] = set()
    experts_seen: dict[tuple[int, str], set[int]] = {}
    unknown, misshapen, duplicate, bad_slopes = [], [], [], []
    misshapen_targets: set[str] = set()
    seen_keys: set[str] = set()

    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in seen_keys:
                    duplicate.append(f"{key} (again in {file.name})")
                    continue
                seen_keys.add(key)
                shape = tuple(f.get_slice(key).get_shape())
                target, place = _route(key, params, config)
                if target is None:
                    if key == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied: the embedding is the head
                    if place == "derived":
                        bad = _check_derived(key, shape, f, model)
                        if bad:
                            bad_slopes.append(bad)
                        continue
                    unknown.append(f"{key} {list(shape)}")
                    continue
                param = params[target]
                if place is None:
                    dest, expect = param, tuple(param.shape)
                else:
                    e, which = place
                    Fdim = config.intermediate_size
                    if which == "w1":
                        dest = param[e, :Fdim]
                    elif which == "w3":
                        dest = param[e, Fdim:]
                    else:
                        dest = param[e]
                    expect = tuple(dest.shape)
                ok = shape == expect
                if ok:
                    dest.copy_(f.get_tensor(key))
                else:
                    misshapen.append(f"{key}: checkpoint {list(shape)}, model expects {list(expect)}")
                # A misshapen tensor counts as present: it is reported once, as misshapen.
                if place is None:
                    (filled if ok else misshapen_targets).add(target)
                else:
                    layer = int(target.split(".")[2])
                    experts_seen.setdefault((layer, place[1]), set()).add(place[0])

    # Per-expert tensors fill a fused parameter once every expert's pieces are there.
    missing, reported = [], set()
    for layer in range(config.num_hidden_layers):
        for fused, pieces in (("gate_up_proj", ("w1", "w3")), ("down_proj", ("w2",))):
            name = f"model.layers.{layer}.mlp.experts.{fused}"
            seen = {w: experts_seen.get((layer, w), set()) for w in pieces}
            if name not in params or not any(seen.values()):
                continue
            reported.add(name)
            if name in filled:
                duplicate.append(f"{name} (fused and per-expert copies)")
                continue
            lacking = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                       for w in pieces for e in range(E) if e not in seen[w]]
            missing += lacking
            filled.add(name)  # complete, or its gaps are listed above
    missing += [name for name in params if name not in filled | reported | misshapen_targets]

    problems = []
    if unknown:
        problems.append(_listing("tensors the model does not have", sorted(unknown)))
    if missing:
        problems.append(_listing("tensors the checkpoint lacks", sorted(set(missing))))
    if misshapen:
        problems.append(_listing("tensors with the wrong shape", sorted(misshapen)))
    if duplicate:
        problems.append(_listing("tensors stored twice", sorted(duplicate)))
    if bad_slopes:
        problems.append(_listing("lightning decay rates that disagree with config.json", bad_slopes))
    if problems:
        where = files[0].parent
        raise CheckpointError(f"checkpoint {where} does not match its config.json:\n" + "\n".join(problems))


def _fused_name(layer: int, which: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{'down_proj' if which == 'w2' else 'gate_up_proj'}"


def _route(key: str, params: dict, config: M1Config):
    """(parameter name, None) for whole tensors, (parameter name, (expert, w1|w2|w3)) for expert
    slices, (None, "derived") for transformers' decay buffers, (None, None) for unknown names."""
    if key in params:
        return key, None
    m = _EXPERT.fullmatch(key)
    if m:
        layer, e, which = int(m.group(1)), int(m.group(2)), m.group(3)
        name = _fused_name(layer, which)
        if name in params and e < config.num_local_experts:
            return name, (e, which)
        return None, None
    m = _ROUTER.fullmatch(key)
    if m:
        name = f"model.layers.{m.group(1)}.mlp.gate.weight"
        return (name, None) if name in params else (None, None)
    m = _BUFFER.fullmatch(key)
    if m and int(m.group(1)) in config.linear_layers:
        return None, "derived"
    m = _INV_FREQ.fullmatch(key)
    if m and int(m.group(1)) in config.softmax_layers:
        return None, "derived"
    return None, None


def _check_derived(key: str, shape: tuple, f, model) -> str | None:
    """slope_rate must equal the formula (a mismatch means config.json describes another model)."""
    m = _BUFFER.fullmatch(key)
    if m is None or m.group(2) != "slope_rate":
        return None
    layer = int(m.group(1))
    ours = torch.tensor(model.config.slopes(layer), dtype=torch.float64)
    theirs = f.get_tensor(key).double().reshape(-1)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=0.0):
        return f"{key}: checkpoint {theirs.tolist()[:4]}..., formula {ours.tolist()[:4]}..."
    return None


# ------------------------------------------------------------------------------- saving


def _decay_buffers(config: M1Config, layer: int) -> dict[str, torch.Tensor]:
    """transformers' derived buffers of one lightning layer (fp32), from the slopes and block size."""
    s = torch.tensor(config.slopes(layer), dtype=torch.float32)[:, None, None]  # [H, 1, 1]
    idx = torch.arange(1, config.block_size + 1, dtype=torch.float32)[:, None]  # [bs, 1]: 1..bs
    dist = idx - idx.t()  # i - j
    diag = torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), torch.zeros(()))[None]  # [1, H, bs, bs]
    return {
        "slope_rate": s,
        "query_decay": torch.exp(-s * idx),  # [H, bs, 1]
        "key_decay": torch.exp(-s * (config.block_size - idx)),
        "diagonal_decay": diag,
    }


def _tensors_to_save(
    model, layout: str, transformers_buffers: bool
) -> Iterator[tuple[str, Callable[[], torch.Tensor], int]]:
    """(name, producer, bytes) of every tensor of the checkpoint, produced lazily (bounded memory)."""
    config: M1Config = model.config
    Fdim = config.intermediate_size
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        nbytes = p.numel() * p.element_size()
        prefix = name.rsplit(".mlp.", 1)[0]
        if layout == "per_expert" and name.endswith(".mlp.experts.gate_up_proj"):
            for e in range(config.num_local_experts):
                yield (f"{prefix}.block_sparse_moe.experts.{e}.w1.weight", lambda p=p, e=e: p[e, :Fdim].clone(),
                       nbytes // (2 * config.num_local_experts))
                yield (f"{prefix}.block_sparse_moe.experts.{e}.w3.weight", lambda p=p, e=e: p[e, Fdim:].clone(),
                       nbytes // (2 * config.num_local_experts))
        elif layout == "per_expert" and name.endswith(".mlp.experts.down_proj"):
            for e in range(config.num_local_experts):
                yield (f"{prefix}.block_sparse_moe.experts.{e}.w2.weight", lambda p=p, e=e: p[e].clone(),
                       nbytes // config.num_local_experts)
        elif layout == "per_expert" and name.endswith(".mlp.gate.weight"):
            yield f"{prefix}.block_sparse_moe.gate.weight", lambda p=p: p.clone(), nbytes
        else:
            yield name, lambda p=p: p.clone(), nbytes
    if transformers_buffers:
        for layer in config.linear_layers:
            for buf, value in _decay_buffers(config, layer).items():
                yield f"model.layers.{layer}.self_attn.{buf}", lambda v=value: v, value.numel() * 4


@torch.no_grad()
def save_pretrained(model, path, *, layout: str = "per_expert", max_shard_bytes: int = 5 * 2**30,
                    transformers_buffers: bool = True) -> None:
    """Writes config.json and safetensors (sharded with an index above max_shard_bytes).

    layout: "per_expert" (block_sparse_moe.experts.e.w1/w2/w3: what transformers 5
    saves and the original release, vLLM and transformers 4 read) or "fused"
    (mlp.experts.gate_up_proj/down_proj: transformers 5's in-memory layout).
    transformers_buffers: also write transformers' derived decay buffers.
    Every file is written to a temporary name, fsynced and renamed into place.
    """
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout must be 'per_expert' or 'fused', got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, Callable[[], torch.Tensor]]]] = [[]]
    size, total = 0, 0
    for name, produce, nbytes in _tensors_to_save(model, layout, transformers_buffers):
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, produce))
        size += nbytes
        total += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for file, shard in zip(names, shards):
        tensors = {name: produce().contiguous().cpu() for name, produce in shard}
        with atomic_path(path / file) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, s in zip(names, shards) for k, _ in s}}
        with atomic_path(path / INDEX_FILE) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")
    config = model.config.to_dict()
    config["dtype"] = str(model.dtype).replace("torch.", "")
    with atomic_path(path / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    # Files of an earlier save that this one does not use would confuse a loader.
    stale = [p for p in path.glob("model*.safetensors") if p.name not in names]
    if n == 1 and (path / INDEX_FILE).exists():
        stale.append(path / INDEX_FILE)
    for p in stale:
        p.unlink()
    fsync_dir(path)
