"""M1Config: presets, both config.json dialects, and clear errors for bad configs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from m1model import ConfigError, M1Config
from m1model.config import FULL, LINEAR

# The original MiniMax-M1 release config.json (MiniMaxM1ForCausalLM), from the published
# architecture (DESIGN 1) in the key set of the release.
ALPHA = 3.5565588200778455
M1_RELEASE_CONFIG = {
    "architectures": ["MiniMaxM1ForCausalLM"],
    "model_type": "minimax_m1",
    "attn_type_list": [1 if (i + 1) % 8 == 0 else 0 for i in range(80)],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 6144,
    "intermediate_size": 9216,
    "layernorm_full_attention_alpha": ALPHA,
    "layernorm_full_attention_beta": 1.0,
    "layernorm_linear_attention_alpha": ALPHA,
    "layernorm_linear_attention_beta": 1.0,
    "layernorm_mlp_alpha": ALPHA,
    "layernorm_mlp_beta": 1.0,
    "max_position_embeddings": 10240000,
    "num_attention_heads": 64,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "postnorm": True,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000000,
    "rotary_dim": 64,
    "shared_intermediate_size": 0,
    "shared_moe_mode": "sigmoid",
    "sliding_window": None,
    "tie_word_embeddings": False,
    "vocab_size": 200064,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "transformers_version": "4.45.2",
}


def assert_same_config(a: M1Config, b: M1Config) -> None:
    for f in dataclasses.fields(M1Config):
        if f.name == "extra":
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, float):
            assert math.isclose(x, y, rel_tol=1e-12), f"{f.name}: {x} != {y}"
        else:
            assert x == y, f"{f.name}: {x!r} != {y!r}"


def test_minimax_m1_preset_matches_the_paper():
    c = M1Config.preset("minimax-m1")
    assert c.softmax_layers == list(range(7, 80, 8)) and len(c.linear_layers) == 70
    assert (c.hidden_size, c.num_attention_heads, c.head_dim, c.num_key_value_heads) == (6144, 64, 128, 8)
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size, c.vocab_size) == (32, 2, 9216, 200064)
    assert (c.rotary_dim, c.rope_theta, c.block_size, c.rms_norm_eps) == (64, 1e7, 256, 1e-5)
    assert math.isclose(c.mlp_alpha, 3.5566, abs_tol=1e-4) and c.postnorm
    n = c.param_counts()
    # Paper: 456B total, 45.9B activated per token (the latter without embedding and LM head).
    assert abs(n["total"] / 456e9 - 1) < 0.005, n["total"]
    assert abs((n["active"] - n["embedding"] - n["lm_head"]) / 45.9e9 - 1) < 0.005, n["active"]


def test_slopes_follow_the_formula():
    c = M1Config.preset("minimax-m1")
    # First layer: s_h = 2^(-8(h+1)/64) (1 + 1e-5); last layer: factor 1 - 79/(79 + 1e-5) + 1e-5 ~ 1.13e-5.
    assert math.isclose(c.slopes(0)[0], 2 ** (-8 / 64) * (1 + 1e-5), rel_tol=1e-12)
    assert math.isclose(c.slopes(0)[63], 2.0**-8 * (1 + 1e-5), rel_tol=1e-12)
    assert math.isclose(c.slopes(79)[0], 2 ** (-8 / 64) * (1 - 79 / (79 + 1e-5) + 1e-5), rel_tol=1e-9)
    assert all(a > b for a, b in zip(c.slopes(0), c.slopes(0)[1:])), "slopes fall with the head index"


def test_reads_the_original_release_config():
    assert_same_config(M1Config.from_dict(M1_RELEASE_CONFIG), M1Config.preset("minimax-m1"))


def test_reads_transformers_minimaxconfig():
    from transformers import MiniMaxConfig

    types = ["linear_attention", "full_attention", "linear_attention"]
    hf = MiniMaxConfig(
        vocab_size=100, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=3, num_experts_per_tok=2, layer_types=types,
        block_size=7, rope_theta=123.0, full_attn_alpha_factor=2.5, linear_attn_beta_factor=0.5,
        mlp_alpha_factor=1.5, rms_norm_eps=1e-6,
    )
    c = M1Config.from_dict(hf.to_dict())
    assert c.layer_types == tuple(types) and c.block_size == 7 and c.rope_theta == 123.0
    assert (c.full_attn_alpha, c.linear_attn_beta, c.mlp_alpha, c.full_attn_beta) == (2.5, 0.5, 1.5, 1.0)
    assert c.rotary_dim == c.head_dim == 8 and c.postnorm and c.rms_norm_eps == 1e-6
    assert c.lightning_norm_eps == 1e-6  # transformers' lightning RMSNorm keeps its default eps


def test_to_dict_round_trips_and_transformers_reads_it(tmp_path):
    from transformers import AutoConfig

    c = M1Config.preset("tiny", eos_token_id=[3, 5], linear_attn_alpha=1.25)
    assert_same_config(M1Config.from_dict(json.loads(json.dumps(c.to_dict()))), c)
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "MiniMaxConfig"
    assert list(hf.layer_types) == list(c.layer_types) and hf.linear_attn_alpha_factor == 1.25
    assert hf.block_size == c.block_size and hf.rope_parameters["rope_theta"] == c.rope_theta
    assert_same_config(M1Config.from_pretrained(tmp_path), c)


def test_unknown_keys_are_kept_for_saving():
    raw = dict(M1_RELEASE_CONFIG, my_note="kept")
    c = M1Config.from_dict(raw)
    assert c.extra == {"my_note": "kept"} and c.to_dict()["my_note"] == "kept"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": None}, "missing key 'hidden_size'"),
        ({"num_local_experts": None}, "missing key 'num_local_experts'"),
        ({"attn_type_list": [0] * 79}, "attn_type_list has 79 entries but num_hidden_layers is 80"),
        ({"attn_type_list": [2] * 80}, "attn_type_list must be a list of 0"),
        ({"layer_types": ["linear_attention"] * 80}, "layer_types and attn_type_list disagree"),
        ({"full_attn_alpha_factor": 1.0}, "disagree"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}, "rope_theta"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"shared_intermediate_size": 512}, "shared_intermediate_size"),
        ({"rotary_dim": 130}, "rotary_dim"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
        ({"num_experts_per_tok": 33}, "num_experts_per_tok"),
    ],
    ids=lambda x: str(x)[:40] if isinstance(x, str) else None,
)
def test_bad_configs_name_the_key(change, message):
    raw = dict(M1_RELEASE_CONFIG)
    for key, value in change.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        M1Config.from_dict(raw)


def test_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 5}))
    with pytest.raises(ConfigError, match=r"config\.json: missing key 'hidden_size'"):
        M1Config.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        M1Config.from_pretrained(tmp_path / "nowhere")


def test_dataclass_validation():
    with pytest.raises(ConfigError, match="layer_types has 3 entries"):
        M1Config(num_hidden_layers=4, layer_types=(LINEAR, LINEAR, FULL))
    with pytest.raises(ConfigError, match=r"layer_types\[1\]"):
        M1Config(num_hidden_layers=2, layer_types=(LINEAR, "mamba"))
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer"):
        M1Config(hidden_size=0)
    with pytest.raises(ConfigError, match="unknown preset"):
        M1Config.preset("gigantic")
