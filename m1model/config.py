"""M1Config: the MiniMax-M1 architecture's hyper-parameters (DESIGN 1 and 5).

Reads both config.json dialects that exist for this architecture:

- transformers' ``MiniMaxConfig`` (model_type "minimax"): ``layer_types``
  ("linear_attention" / "full_attention"), ``full_attn_alpha_factor`` and
  friends, ``block_size``, ``rope_parameters`` (or the older top-level
  ``rope_theta``); rotary embedding over the whole head.
- the original MiniMax-Text-01 / MiniMax-M1 release (MiniMaxM1ForCausalLM):
  ``attn_type_list`` (0 = lightning, 1 = softmax),
  ``layernorm_{linear_attention,full_attention,mlp}_{alpha,beta}``,
  ``postnorm``, ``rotary_dim``, ``rope_theta``.

Keys both dialects name (e.g. ``layer_types`` and ``attn_type_list``) must agree.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LINEAR = "linear_attention"  # lightning attention layer
FULL = "full_attention"  # softmax attention layer
LAYER_TYPES = (LINEAR, FULL)


class ConfigError(ValueError):
    """A config.json that is missing a key, names an unknown value or contradicts itself."""


@dataclass
class M1Config:
    # --- sizes ---
    vocab_size: int = 256  # tokens in the embedding and the LM head
    hidden_size: int = 64  # model width D
    num_hidden_layers: int = 4  # L, lightning and softmax layers together
    num_attention_heads: int = 4  # H: query heads of softmax layers, heads of lightning layers
    num_key_value_heads: int = 2  # KV heads of softmax layers (GQA); lightning layers have H
    head_dim: int = 16  # Dh: per-head dim of q, k, v in both layer kinds
    layer_types: tuple[str, ...] = (LINEAR, LINEAR, LINEAR, FULL)  # per layer: LINEAR or FULL
    # --- mixture of experts (every layer) ---
    intermediate_size: int = 64  # F: FFN width of one expert
    num_local_experts: int = 4  # E: experts per layer
    num_experts_per_tok: int = 2  # top-k experts per token
    # --- softmax attention ---
    rotary_dim: int = 16  # RoPE (NeoX rotate-half) on the first rotary_dim dims of each head
    rope_theta: float = 10000.0  # RoPE base
    max_position_embeddings: int = 8192  # informational (RoPE is computed for any position)
    # --- lightning attention ---
    block_size: int = 16  # block length of the blockwise prefill algorithm
    lightning_norm_eps: float = 1e-6  # eps of the RMSNorm over H*Dh (transformers and the original code: 1e-6)
    # --- normalisation and residuals (DESIGN 5) ---
    rms_norm_eps: float = 1e-5  # eps of the layer norms and the final norm
    postnorm: bool = True  # residual taken after the norm (M1, transformers) or before it
    linear_attn_alpha: float = 1.0  # residual scale after a lightning layer
    linear_attn_beta: float = 1.0  # output scale of a lightning layer
    full_attn_alpha: float = 1.0  # residual scale after a softmax layer
    full_attn_beta: float = 1.0  # output scale of a softmax layer
    mlp_alpha: float = 1.0  # residual scale after the MoE block
    mlp_beta: float = 1.0  # output scale of the MoE block
    # --- head and tokens ---
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (M1: untied)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # one id or several; generation stops on any
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # unread keys, kept for saving

    def __post_init__(self) -> None:
        self.layer_types = tuple(self.layer_types)
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "intermediate_size", "num_local_experts",
                    "num_experts_per_tok", "block_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"M1Config.{name} must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"M1Config.layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ConfigError(f"M1Config.layer_types[{i}] is {kind!r}; expected one of {LAYER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"M1Config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"M1Config.num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_local_experts "
                f"({self.num_local_experts})"
            )
        if not (0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ConfigError(
                f"M1Config.rotary_dim must be even and in [0, head_dim={self.head_dim}], got {self.rotary_dim}"
            )
        if not self.rope_theta > 0:
            raise ConfigError(f"M1Config.rope_theta must be positive, got {self.rope_theta}")

    # ----------------------------------------------------------------- derived

    @property
    def linear_layers(self) -> list[int]:
        """Indices of the lightning attention layers."""
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    @property
    def softmax_layers(self) -> list[int]:
        """Indices of the softmax attention layers."""
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    def slopes(self, layer: int) -> list[float]:
        """Decay rates s_h of lightning layer `layer` (DESIGN 5; l counts all layers).

        s_h = (2^(-8/H))^(h+1) * (1 - l / (L - 1 + 1e-5) + 1e-5), h = 0..H-1.
        """
        H, L = self.num_attention_heads, self.num_hidden_layers
        base = 2.0 ** (-8.0 / H)
        factor = 1.0 - layer / (L - 1 + 1e-5) + 1e-5
        return [base ** (h + 1) * factor for h in range(H)]

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by component, for FLOPs and memory models.

        ``total`` counts everything; ``active`` counts what one token touches
        (top-k of the experts) and includes the embedding and LM head; the paper's
        45.9B active parameters correspond to ``active - embedding - lm_head``.
        """
        D, H, Hkv, Dh = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        E, k, F, V = self.num_local_experts, self.num_experts_per_tok, self.intermediate_size, self.vocab_size
        lightning = D * 3 * H * Dh + D * H * Dh + H * Dh * D + H * Dh  # qkv, output gate, out_proj, norm
        softmax = D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D  # q, k, v, o
        expert = 3 * D * F  # gate, up, down
        n_lin, n_soft = len(self.linear_layers), len(self.softmax_layers)
        counts = {
            "embedding": V * D,
            "lm_head": 0 if self.tie_word_embeddings else V * D,
            "attention": n_lin * lightning + n_soft * softmax,
            "router": self.num_hidden_layers * E * D,
            "experts": self.num_hidden_layers * E * expert,
            "experts_active": self.num_hidden_layers * k * expert,
            "norms": self.num_hidden_layers * 2 * D + D,
        }
        shared = counts["embedding"] + counts["lm_head"] + counts["attention"] + counts["router"] + counts["norms"]
        counts["total"] = shared + counts["experts"]
        counts["active"] = shared + counts["experts_active"]
        return counts

    # -------------------------------------------------------------- presets

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "M1Config":
        """A named configuration: see PRESETS. Keyword arguments override fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name](), **overrides)

    # -------------------------------------------------------------- config.json

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "M1Config":
        """Reads config.json from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file}")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{file}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "M1Config":
        """Builds a config from either config.json dialect (see the module docstring)."""
        return _from_dict(cls, dict(raw))

    def to_dict(self) -> dict[str, Any]:
        """config.json contents that transformers' MiniMaxForCausalLM loads.

        Written in the transformers key set, plus the original keys it ignores
        (``rotary_dim``, ``postnorm``, ``lightning_norm_eps``) so that m1model reads
        back exactly this config. transformers applies RoPE to the whole head and
        always uses post-norm: a config with rotary_dim < head_dim or postnorm off
        loads there but computes something else.
        """
        out = dict(self.extra)
        out.update(
            architectures=["MiniMaxForCausalLM"],
            model_type="minimax",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            layer_types=list(self.layer_types),
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rotary_dim=self.rotary_dim,
            max_position_embeddings=self.max_position_embeddings,
            block_size=self.block_size,
            rms_norm_eps=self.rms_norm_eps,
            lightning_norm_eps=self.lightning_norm_eps,
            postnorm=self.postnorm,
            linear_attn_alpha_factor=self.linear_attn_alpha,
            linear_attn_beta_factor=self.linear_attn_beta,
            full_attn_alpha_factor=self.full_attn_alpha,
            full_attn_beta_factor=self.full_attn_beta,
            mlp_alpha_factor=self.mlp_alpha,
            mlp_beta_factor=self.mlp_beta,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            sliding_window=None,
            attention_dropout=0.0,
            router_jitter_noise=0.0,
        )
        return out


# ---------------------------------------------------------------------------- presets


def _every_nth_softmax(num_layers: int, period: int) -> tuple[str, ...]:
    """Layer l is softmax when (l + 1) % period == 0 (M1: layers 7, 15, ..., 79)."""
    return tuple(FULL if (i + 1) % period == 0 else LINEAR for i in range(num_layers))


def _minimax_m1() -> M1Config:
    """The published MiniMax-M1 (456B total, 45.9B active): DESIGN 1."""
    alpha = (2 * 80) ** 0.25  # 3.5566; the release config stores 3.5565588200778455
    return M1Config(
        vocab_size=200064, hidden_size=6144, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, layer_types=_every_nth_softmax(80, 8),
        intermediate_size=9216, num_local_experts=32, num_experts_per_tok=2,
        rotary_dim=64, rope_theta=1e7, max_position_embeddings=10240000,
        block_size=256, lightning_norm_eps=1e-6, rms_norm_eps=1e-5, postnorm=True,
        linear_attn_alpha=alpha, linear_attn_beta=1.0, full_attn_alpha=alpha, full_attn_beta=1.0,
        mlp_alpha=alpha, mlp_beta=1.0, tie_word_embeddings=False,
    )


def _tiny() -> M1Config:
    """Seconds on a CPU: tests. Two lightning blocks per 32 tokens, GQA, partial RoPE."""
    return M1Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, layer_types=_every_nth_softmax(4, 4), intermediate_size=64, num_local_experts=4,
        num_experts_per_tok=2, rotary_dim=8, rope_theta=10000.0, block_size=16,
        linear_attn_alpha=(2 * 4) ** 0.25, full_attn_alpha=(2 * 4) ** 0.25, mlp_alpha=(2 * 4) ** 0.25,
    )


def _small() -> M1Config:
    """M1-shaped at 1/16 scale for CPU benchmarks: 7:1 lightning:softmax, Dh=128, block 256."""
    L = 8
    alpha = (2 * L) ** 0.25
    return M1Config(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=L, num_attention_heads=8, num_key_value_heads=1,
        head_dim=128, layer_types=_every_nth_softmax(L, 8), intermediate_size=1024, num_local_experts=8,
        num_experts_per_tok=2, rotary_dim=64, rope_theta=1e7, max_position_embeddings=65536, block_size=256,
        linear_attn_alpha=alpha, full_attn_alpha=alpha, mlp_alpha=alpha,
    )


PRESETS = {"minimax-m1": _minimax_m1, "tiny": _tiny, "small": _small}


# ---------------------------------------------------------------------- config.json reading

_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_local_experts", "num_experts_per_tok")

# (field, transformers key, original key, default) for the residual scales.
_RESIDUAL_KEYS = (
    ("linear_attn_alpha", "linear_attn_alpha_factor", "layernorm_linear_attention_alpha"),
    ("linear_attn_beta", "linear_attn_beta_factor", "layernorm_linear_attention_beta"),
    ("full_attn_alpha", "full_attn_alpha_factor", "layernorm_full_attention_alpha"),
    ("full_attn_beta", "full_attn_beta_factor", "layernorm_full_attention_beta"),
    ("mlp_alpha", "mlp_alpha_factor", "layernorm_mlp_alpha"),
    ("mlp_beta", "mlp_beta_factor", "layernorm_mlp_beta"),
)

# Keys that describe nothing the model computes (training knobs, bookkeeping).
_IGNORED = {
    "architectures", "model_type", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "attention_dropout",
    "router_jitter_noise", "keys_to_ignore_at_inference", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "shared_moe_mode", "quantization_config",
}


def _pick(raw: dict, field_name: str, keys: tuple[str, ...], default: Any) -> Any:
    """The value of whichever of `keys` is present; they must agree when several are."""
    present = [(k, raw.pop(k)) for k in keys if k in raw]
    if not present:
        return default
    key0, value0 = present[0]
    for key, value in present[1:]:
        if not _same(value, value0):
            raise ConfigError(f"{key0}={value0!r} and {key}={value!r} disagree (both give {field_name})")
    return value0


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _layer_types(raw: dict, num_layers: int) -> tuple[str, ...]:
    from_t = raw.pop("layer_types", None)
    from_o = raw.pop("attn_type_list", None)
    if from_t is None and from_o is None:
        if raw.get("model_type") in (None, "minimax"):
            # transformers' MiniMaxConfig default: softmax, lightning, softmax, ...
            return tuple(FULL if (i + 1) % 2 else LINEAR for i in range(num_layers))
        raise ConfigError("missing key 'attn_type_list' (or 'layer_types'): which layers are softmax attention")
    types_o = None
    if from_o is not None:
        if not isinstance(from_o, list) or any(x not in (0, 1) for x in from_o):
            raise ConfigError(f"attn_type_list must be a list of 0 (lightning) / 1 (softmax), got {from_o!r}")
        types_o = tuple(FULL if x == 1 else LINEAR for x in from_o)
    types_t = None
    if from_t is not None:
        if not isinstance(from_t, list) or any(x not in LAYER_TYPES for x in from_t):
            raise ConfigError(f"layer_types must be a list of {LAYER_TYPES}, got {from_t!r}")
        types_t = tuple(from_t)
    if types_o is not None and types_t is not None and types_o != types_t:
        raise ConfigError("layer_types and attn_type_list disagree")
    types = types_t if types_t is not None else types_o
    key = "layer_types" if types_t is not None else "attn_type_list"
    if len(types) != num_layers:
        raise ConfigError(f"{key} has {len(types)} entries but num_hidden_layers is {num_layers}")
    return types


def _rope_theta(raw: dict) -> float:
    params = raw.pop("rope_parameters", None)
    scaling = raw.pop("rope_scaling", None)
    top = raw.pop("rope_theta", None)
    theta = None
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"rope_parameters must be a mapping, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported (only 'default')")
        theta = params.get("rope_theta")
        if params.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise ConfigError("rope_parameters.partial_rotary_factor is not read; use rotary_dim")
    if scaling is not None:
        raise ConfigError(f"rope_scaling={scaling!r} is not supported (only plain RoPE)")
    if theta is not None and top is not None and not _same(theta, top):
        raise ConfigError(f"rope_theta={top!r} and rope_parameters.rope_theta={theta!r} disagree")
    theta = theta if theta is not None else top
    if theta is None:
        if raw.get("model_type") in (None, "minimax"):
            return 1e6  # transformers' MiniMaxConfig default
        raise ConfigError("missing key 'rope_theta'")
    return float(theta)


def _from_dict(cls, raw: dict[str, Any]) -> M1Config:
    for key in _REQUIRED:
        if key not in raw and not (key == "num_local_experts" and "num_experts" in raw):
            raise ConfigError(f"missing key {key!r}")
    # The original release's keys; transformers always uses post-norm and has no key for it,
    # while the original code defaults to pre-norm when `postnorm` is absent.
    original = (
        "attn_type_list" in raw
        or any(o in raw for _, _, o in _RESIDUAL_KEYS)
        or raw.get("model_type") not in (None, "minimax")
    )
    hidden_act = raw.pop("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"hidden_act={hidden_act!r} is not supported (MiniMax uses 'silu')")
    if raw.pop("sliding_window", None) is not None:
        raise ConfigError("sliding_window is not supported: MiniMax softmax layers attend to the whole context")
    if raw.pop("shared_intermediate_size", 0) not in (0, None):
        raise ConfigError("shared_intermediate_size > 0 (a shared expert) is not supported; M1 has none")
    if raw.pop("attention_bias", False):
        raise ConfigError("attention_bias=true is not supported; MiniMax projections have no bias")

    num_layers = raw.pop("num_hidden_layers")
    heads = raw.pop("num_attention_heads")
    hidden = raw.pop("hidden_size")
    head_dim = raw.pop("head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"missing key 'head_dim' and hidden_size={hidden} is not a multiple of {heads} heads")
        head_dim = hidden // heads
    kwargs: dict[str, Any] = dict(
        vocab_size=raw.pop("vocab_size"),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=raw.pop("num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=raw.pop("intermediate_size"),
        num_local_experts=_pick(raw, "num_local_experts", ("num_local_experts", "num_experts"), None),
        num_experts_per_tok=raw.pop("num_experts_per_tok"),
        layer_types=_layer_types(raw, num_layers),
        rope_theta=_rope_theta(raw),
        rotary_dim=raw.pop("rotary_dim", None) or head_dim,
        max_position_embeddings=raw.pop("max_position_embeddings", 8192),
        block_size=raw.pop("block_size", 256),
        rms_norm_eps=raw.pop("rms_norm_eps", 1e-5),
        lightning_norm_eps=raw.pop("lightning_norm_eps", 1e-6),
        tie_word_embeddings=raw.pop("tie_word_embeddings", False),
        bos_token_id=raw.pop("bos_token_id", None),
        eos_token_id=raw.pop("eos_token_id", None),
        pad_token_id=raw.pop("pad_token_id", None),
    )
    kwargs["postnorm"] = bool(raw.pop("postnorm", not original))
    for name, t_key, o_key in _RESIDUAL_KEYS:
        kwargs[name] = float(_pick(raw, name, (t_key, o_key), 1.0))
    for key in _IGNORED:
        raw.pop(key, None)
    kwargs["extra"] = raw  # what is left: kept so that save_pretrained writes it back
    return cls(**kwargs)
