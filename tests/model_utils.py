"""Shared pieces of the m1model tests: random models and transformers' MiniMax on the same weights."""

from __future__ import annotations

import dataclasses
import logging

import torch

from m1model import M1Config, M1ForCausalLM
from m1model.config import FULL, LINEAR

# Parity budget of the issue: relative error of fp32 logits against transformers' MiniMax.
PARITY_TOL = 1e-4

# Configs for parity with transformers (rotary over the whole head, post-norm): they mix
# lightning and softmax layers, use GQA/MQA, and their sequences span several lightning blocks.
PARITY_CONFIGS = {
    "tiny,L=4,H=4,kv=2,bs=16": M1Config.preset("tiny", rotary_dim=16),
    "L=5,H=6,kv=3,Dh=8,bs=5,top3,alphas": M1Config(
        vocab_size=97, hidden_size=48, num_hidden_layers=5, num_attention_heads=6, num_key_value_heads=3,
        head_dim=8, layer_types=(FULL, LINEAR, LINEAR, FULL, LINEAR), intermediate_size=24, num_local_experts=5,
        num_experts_per_tok=3, rotary_dim=8, rope_theta=500.0, block_size=5,
        linear_attn_alpha=1.7, linear_attn_beta=0.6, full_attn_alpha=1.3, full_attn_beta=0.8,
        mlp_alpha=1.9, mlp_beta=1.1,
    ),
    "L=3,H=2,kv=1,Dh=32,bs=32,top1": M1Config(
        vocab_size=130, hidden_size=40, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, layer_types=(LINEAR, FULL, LINEAR), intermediate_size=56, num_local_experts=3,
        num_experts_per_tok=1, rotary_dim=32, rope_theta=1e7, block_size=32, mlp_alpha=2.0,
    ),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that every component moves the logits; norm weights away from 1.

    The router gets std 1 so that top-k choices are decisive (a near-tie between two
    experts would make two correct implementations route a token differently).
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif "gate.weight" in name and "output_gate" not in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return model


def random_model(config: M1Config, seed: int = 0) -> M1ForCausalLM:
    return randomize_(M1ForCausalLM(config), seed).eval()


def with_(config: M1Config, **changes) -> M1Config:
    return dataclasses.replace(config, **changes)


def load_transformers(path, **kwargs):
    """transformers' MiniMaxForCausalLM from a checkpoint directory (its load report silenced)."""
    from transformers import MiniMaxForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model, info = MiniMaxForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    return model.eval(), info
