"""Checkpoint loading and saving: both weight layouts, shards, transformers interop, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from model_utils import load_transformers, random_model, with_
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m1model import CheckpointError, M1Config, M1ForCausalLM

TINY = M1Config.preset("tiny")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert pa[name].dtype == pb[name].dtype, name
        assert torch.equal(pa[name], pb[name]), name


def tensor_names(path) -> set[str]:
    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names |= set(f.keys())
    return names


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_round_trip(tmp_path, layout):
    model = random_model(TINY, seed=1)
    model.save_pretrained(tmp_path, layout=layout)
    names = tensor_names(tmp_path)
    expert = "model.layers.0.block_sparse_moe.experts.3.w3.weight" if layout == "per_expert" else \
        "model.layers.0.mlp.experts.gate_up_proj"
    assert expert in names
    assert not list(tmp_path.glob(".*")), "temporary files left behind"
    assert_same_weights(M1ForCausalLM.from_pretrained(tmp_path), model)


def test_per_expert_slices_are_gate_up_down(tmp_path):
    """w1 = gate rows, w3 = up rows of gate_up_proj; w2 = down_proj (DESIGN 5)."""
    model = random_model(TINY, seed=2)
    model.save_pretrained(tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    F = TINY.intermediate_size
    gu = model.model.layers[1].mlp.experts.gate_up_proj
    dn = model.model.layers[1].mlp.experts.down_proj
    assert torch.equal(t["model.layers.1.block_sparse_moe.experts.2.w1.weight"], gu[2, :F])
    assert torch.equal(t["model.layers.1.block_sparse_moe.experts.2.w3.weight"], gu[2, F:])
    assert torch.equal(t["model.layers.1.block_sparse_moe.experts.2.w2.weight"], dn[2])


def test_sharded_round_trip_and_resave(tmp_path):
    model = random_model(TINY, seed=3)
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert set(index["weight_map"]) == tensor_names(tmp_path)
    assert_same_weights(M1ForCausalLM.from_pretrained(tmp_path), model)
    # Saving again as one file removes the shards and the index of the earlier save.
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_weights(M1ForCausalLM.from_pretrained(tmp_path), model)


def test_dtype_and_tied_embeddings(tmp_path):
    model = random_model(with_(TINY, tie_word_embeddings=True), seed=4)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in tensor_names(tmp_path)
    loaded = M1ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())
    assert M1ForCausalLM.from_pretrained(tmp_path).dtype == torch.float32  # config.json's dtype


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_transformers_loads_ours_completely(tmp_path, layout):
    config = with_(TINY, rotary_dim=TINY.head_dim)
    random_model(config, seed=5).save_pretrained(tmp_path, layout=layout)
    _, info = load_transformers(tmp_path)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_we_load_what_transformers_saves(tmp_path):
    """transformers 5 writes the per-expert layout plus its decay buffers; all of it is understood."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    config = with_(TINY, rotary_dim=TINY.head_dim)
    hf = MiniMaxForCausalLM(MiniMaxConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"}))
    hf.save_pretrained(tmp_path)
    assert "model.layers.0.self_attn.slope_rate" in tensor_names(tmp_path)
    ours = M1ForCausalLM.from_pretrained(tmp_path)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, hf_params[name]), name


def rewrite(tmp_path, edit) -> None:
    """Applies edit(tensors) to the single-file checkpoint in tmp_path."""
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_unknown_missing_and_misshapen_tensors_are_listed(tmp_path):
    random_model(TINY).save_pretrained(tmp_path)

    def edit(t):
        t["model.layers.0.self_attn.rogue.weight"] = torch.zeros(3)
        del t["model.layers.3.self_attn.k_proj.weight"]
        del t["model.layers.2.block_sparse_moe.experts.1.w3.weight"]
        t["model.norm.weight"] = torch.zeros(7)

    rewrite(tmp_path, edit)
    with pytest.raises(CheckpointError) as exc:
        M1ForCausalLM.from_pretrained(tmp_path)
    msg = str(exc.value)
    assert "tensors the model does not have (1)" in msg and "model.layers.0.self_attn.rogue.weight [3]" in msg
    assert "tensors the checkpoint lacks (2)" in msg
    assert "model.layers.3.self_attn.k_proj.weight" in msg
    assert "model.layers.2.block_sparse_moe.experts.1.w3.weight" in msg
    assert "model.norm.weight: checkpoint [7], model expects [64]" in msg


def test_a_layer_of_the_wrong_kind_is_reported(tmp_path):
    """A lightning layer's weights where config.json says softmax: unknown + missing, not silence."""
    random_model(TINY).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["layer_types"] = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.qkv_proj.weight") as exc:
        M1ForCausalLM.from_pretrained(tmp_path)
    assert "model.layers.1.self_attn.q_proj.weight" in str(exc.value)


def test_fused_and_per_expert_copies_together_are_an_error(tmp_path):
    model = random_model(TINY)
    model.save_pretrained(tmp_path)
    gu = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    rewrite(tmp_path, lambda t: t.__setitem__("model.layers.0.mlp.experts.gate_up_proj", gu))
    with pytest.raises(CheckpointError, match="fused and per-expert copies"):
        M1ForCausalLM.from_pretrained(tmp_path)


def test_slope_rate_must_match_the_config(tmp_path):
    random_model(TINY).save_pretrained(tmp_path)
    rewrite(tmp_path, lambda t: t["model.layers.0.self_attn.slope_rate"].mul_(1.01))
    with pytest.raises(CheckpointError, match="decay rates that disagree"):
        M1ForCausalLM.from_pretrained(tmp_path)


def test_pickles_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="never unpickles"):
        M1ForCausalLM.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    random_model(TINY).save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / lost).unlink()
    with pytest.raises(CheckpointError, match=f"(?s)shard files that do not exist.*{lost}"):
        M1ForCausalLM.from_pretrained(tmp_path)


def test_bad_layout_argument(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        random_model(TINY).save_pretrained(tmp_path, layout="sideways")


def test_loads_an_original_release_checkpoint(tmp_path):
    """The original dialect: attn_type_list, layernorm_*_alpha/beta, postnorm, rotary_dim; per-expert
    weights, no transformers buffers, and the original code's RoPE inv_freq tables."""
    config = with_(TINY, linear_attn_alpha=1.5, mlp_beta=0.75)
    model = random_model(config, seed=6)
    model.save_pretrained(tmp_path, transformers_buffers=False)
    original = {
        "architectures": ["MiniMaxM1ForCausalLM"], "model_type": "minimax_m1",
        "attn_type_list": [1 if t == "full_attention" else 0 for t in config.layer_types],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "num_local_experts": config.num_local_experts, "num_experts_per_tok": config.num_experts_per_tok,
        "rotary_dim": config.rotary_dim, "rope_theta": config.rope_theta, "postnorm": True,
        "rms_norm_eps": config.rms_norm_eps, "block_size": config.block_size,
        "layernorm_linear_attention_alpha": 1.5, "layernorm_linear_attention_beta": 1.0,
        "layernorm_full_attention_alpha": config.full_attn_alpha, "layernorm_full_attention_beta": 1.0,
        "layernorm_mlp_alpha": config.mlp_alpha, "layernorm_mlp_beta": 0.75, "shared_intermediate_size": 0,
    }
    (tmp_path / "config.json").write_text(json.dumps(original))
    inv_freq = torch.rand(config.rotary_dim // 2)
    rewrite(tmp_path, lambda t: t.update({f"model.layers.{l}.self_attn.rotary_emb.inv_freq": inv_freq
                                          for l in config.softmax_layers}))
    loaded = M1ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.linear_attn_alpha == 1.5 and loaded.config.mlp_beta == 0.75
    assert_same_weights(loaded, model)
    ids = torch.randint(0, config.vocab_size, (1, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
