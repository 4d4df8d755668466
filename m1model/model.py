"""MiniMax-M1 on m1 ops (DESIGN 5): hybrid lightning/softmax decoder with MoE and an FP32 head.

Shapes: B batch, T tokens, D model dim, H heads, Hkv KV heads, Dh head dim,
E experts, V vocab, N sequences of a packed batch (B == 1, cu_seqlens [N+1]).

Three input layouts, one code path:
- dense [B, T]: every row is a full sequence (attention_mask absent or all ones);
- packed [1, T] with cu_seqlens: sequences laid end to end (varlen);
- padded [B, T] with attention_mask: packed internally (only the tokens with
  mask 1, per row, in order), so padding takes no compute and contributes
  nothing to any state; outputs at padded positions are 0.
With a HybridCache, a dense batch continues the cached sequences (decoding), and
a packed or padded batch fills an empty cache (prefill).

Parameter names follow transformers' MiniMaxForCausalLM (see m1model.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from m1ops.lightning import DEFAULT_BLOCK_SIZE

from m1model import ops
from m1model.cache import HybridCache
from m1model.config import FULL, M1Config


@dataclass
class _Batch:
    """What every layer needs to know about the token layout of one forward."""

    cos: torch.Tensor | None  # [B, T, rotary_dim] fp32 RoPE tables (None without softmax layers)
    sin: torch.Tensor | None
    cu_seqlens: torch.Tensor | None  # packed layout: [N+1] int64
    bounds: list[tuple[int, int]] | None  # packed layout: (start, end) of each sequence
    same_length: list[torch.Tensor] | None  # packed layout: [m, L] token positions of the m sequences of length L
    cache: HybridCache | None
    positions: torch.Tensor  # [B, T] int64


def lightning_block_size(config_block: int, device: torch.device) -> int:
    """Tokens per block of the lightning prefill as the model runs it.

    The block is a speed knob (DESIGN 3.1: every block gives the same function). The kernels run
    their own (m1ops.lightning.DEFAULT_BLOCK_SIZE, 64: half the intra-block FLOPs of the
    checkpoints' 256, 32 -> 18 ms per layer at T=4096, H=8, K=V=128 on the CPU); the pure-PyTorch
    reference keeps the config's block. FLOP counts of a forward (bench/flops.py) use this too.
    """
    if ops.reference_enabled():
        return config_block
    return DEFAULT_BLOCK_SIZE.get(device.type, config_block)


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back to x's dtype, times the weight (ops.rms_norm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def rope_tables(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rotary_dim] fp32 for positions [B, T] (NeoX layout: both halves share frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=positions.device) / rotary_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, rotary_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first rotary_dim dims of x [B, T, heads, Dh]; the rest pass through."""
    rd = cos.shape[-1]
    if rd == 0:
        return x
    xr = x[..., :rd].float()
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = xr * cos[:, :, None] + torch.cat((-x2, x1), dim=-1) * sin[:, :, None]
    return torch.cat((rotated.to(x.dtype), x[..., rd:]), dim=-1)


class LightningAttention(nn.Module):
    """qkv = silu(x W_qkv^T) split per head; lightning attention; RMSNorm; sigmoid output gate; out_proj."""

    def __init__(self, config: M1Config, layer_idx: int) -> None:
        super().__init__()
        D, H, Dh = config.hidden_size, config.num_attention_heads, config.head_dim
        self.layer_idx, self.heads, self.head_dim, self.block_size = layer_idx, H, Dh, config.block_size
        self.qkv_proj = nn.Linear(D, 3 * H * Dh, bias=False)
        self.output_gate = nn.Linear(D, H * Dh, bias=False)
        self.out_proj = nn.Linear(H * Dh, D, bias=False)
        self.norm = RMSNorm(H * Dh, config.lightning_norm_eps)
        # fp32 decay rates, kept out of the parameters/buffers so that model.to(bf16) cannot round them.
        self._slopes = config.slopes(layer_idx)
        self._slope_cache: dict[torch.device, torch.Tensor] = {}

    def slope(self, device: torch.device) -> torch.Tensor:
        """[H] float32 decay rates of this layer."""
        if device not in self._slope_cache:
            self._slope_cache[device] = torch.tensor(self._slopes, dtype=torch.float32, device=device)
        return self._slope_cache[device]

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        B, T, _ = x.shape
        H, Dh = self.heads, self.head_dim
        qkv = ops.linear(x, self.qkv_proj.weight, "silu").view(B, T, H, 3 * Dh)
        q, k, v = qkv.split(Dh, dim=-1)  # views [B, T, H, Dh] with a contiguous last dim
        slope, cache = self.slope(x.device), batch.cache
        if cache is not None and batch.cu_seqlens is None and T == 1:
            state = cache.states[self.layer_idx]  # [B, H, Dh, Dh] fp32, updated in place
            o = ops.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], slope, state)[:, None]
        else:
            initial = None if cache is None or batch.cu_seqlens is not None else cache.states[self.layer_idx]
            o, final = ops.lightning_attn(
                q, k, v, slope, scale=1.0, initial_state=initial, output_final_state=cache is not None,
                cu_seqlens=batch.cu_seqlens, block_size=lightning_block_size(self.block_size, x.device),
            )
            if cache is not None:
                cache.states[self.layer_idx].copy_(final)
        o = self.norm(o.reshape(B, T, H * Dh))
        return ops.linear(o * ops.linear(x, self.output_gate.weight, "sigmoid"), self.out_proj.weight)


class SoftmaxAttention(nn.Module):
    """GQA with partial rotate-half RoPE and causal SDPA, scale 1/sqrt(Dh)."""

    def __init__(self, config: M1Config, layer_idx: int) -> None:
        super().__init__()
        D, H, Hkv, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx, self.heads, self.kv_heads, self.head_dim = layer_idx, H, Hkv, Dh
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def _sdpa(self, q, k, v, **kw) -> torch.Tensor:
        """q [B, H, Tq, Dh], k/v [B, Hkv, Tk, Dh] -> [B, H, Tq, Dh]."""
        return F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, enable_gqa=True, **kw)

    def _decode_sdpa(self, q, k, v, attn_mask) -> torch.Tensor:
        """One new token per row: q [B, H, 1, Dh], k/v [B, Hkv, S, Dh], attn_mask [B, 1, 1, S] or None ->
        o [B, H, 1, Dh] (what _sdpa returns for one query).

        The G = H / Hkv query heads that share a KV head attend as G query positions of one head
        (they see the same keys, and one token has no causal order among them), so SDPA reads each
        KV head once instead of expanding it G times: on the CPU, [B, 8, 1, 128] against 4096 keys of
        one KV head, fp32 0.32 -> 0.23 ms at B=1 and 4.9 -> 1.9 ms at B=8. In bf16 the CPU's SDPA
        was slow one query per head (9 ms at B=1, so decoding used to attend in fp32 on converted
        keys: 1.25 ms at B=1, 2.3 ms at B=8, most of it the conversion); folded it takes 0.18 ms and
        1.3 ms with the keys as stored.
        """
        B, H, _, Dh = q.shape
        o = F.scaled_dot_product_attention(q.reshape(B, self.kv_heads, H // self.kv_heads, Dh), k, v,
                                           attn_mask=attn_mask, scale=self.head_dim**-0.5)
        return o.reshape(B, H, 1, Dh)

    def _packed(self, q, k, v, same_length: list[torch.Tensor]) -> torch.Tensor:
        """q [T, H, Dh], k/v [T, Hkv, Dh] of packed sequences -> o [T, H, Dh]: causal attention within
        each sequence, the sequences of one length batched into one SDPA call (many short sequences,
        as in RL, would otherwise cost one call each)."""
        index, outs = [], []
        for idx in same_length:  # idx [m, L]
            qb, kb, vb = (t[idx].transpose(1, 2) for t in (q, k, v))  # [m, heads, L, Dh]
            outs.append(self._sdpa(qb, kb, vb, is_causal=True).transpose(1, 2).flatten(0, 1))  # [m * L, H, Dh]
            index.append(idx.flatten())
        o = q.new_zeros(q.shape)
        return o.index_copy(0, torch.cat(index), torch.cat(outs)) if outs else o

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(ops.linear(x, self.q_proj.weight).view(B, T, self.heads, self.head_dim), batch.cos, batch.sin)
        k = apply_rope(ops.linear(x, self.k_proj.weight).view(B, T, self.kv_heads, self.head_dim), batch.cos, batch.sin)
        v = ops.linear(x, self.v_proj.weight).view(B, T, self.kv_heads, self.head_dim)
        cache = batch.cache
        if batch.bounds is not None:  # packed: one causal attention per sequence
            if cache is not None:
                for n, (a, b) in enumerate(batch.bounds):
                    cache.write_prompt(self.layer_idx, n, k[0, a:b], v[0, a:b])
            return ops.linear(self._packed(q[0], k[0], v[0], batch.same_length).reshape(B, T, -1), self.o_proj.weight)
        if cache is None:
            o = self._sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        else:
            fresh = cache.is_empty()  # dense prefill: every row holds tokens 0..T-1, plain causal attention
            keys, values, mask = cache.append(self.layer_idx, k, v, batch.positions)
            if fresh:
                o = self._sdpa(q.transpose(1, 2), keys, values, is_causal=True)
            else:
                # One new token per row and rows of equal length need no mask.
                mask = None if T == 1 and bool(mask.all()) else mask
                attend = self._decode_sdpa if T == 1 else self._sdpa
                o = attend(q.transpose(1, 2), keys, values, attn_mask=mask)
        return ops.linear(o.transpose(1, 2).reshape(B, T, self.heads * self.head_dim), self.o_proj.weight)


class Experts(nn.Module):
    """Expert weights in the transformers 5 / vLLM layout (gate rows first in gate_up_proj)."""

    def __init__(self, config: M1Config) -> None:
        super().__init__()
        E, D, Fdim = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fdim, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fdim))


class SparseMoE(nn.Module):
    """Router [E, D] (no bias, computed in fp32), top-k softmax routing, fused experts."""

    def __init__(self, config: M1Config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(-1, h.shape[-1])  # [B*T, D]
        xf, gate = (t if t.dtype == torch.float32 else t.float() for t in (x, self.gate.weight))
        logits = F.linear(xf, gate)  # [B*T, E] fp32
        weights, ids = ops.moe_route(logits, self.top_k)
        y = ops.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        return y.view_as(h)


class DecoderLayer(nn.Module):
    def __init__(self, config: M1Config, layer_idx: int) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        softmax = config.layer_types[layer_idx] == FULL
        self.self_attn = SoftmaxAttention(config, layer_idx) if softmax else LightningAttention(config, layer_idx)
        self.input_layernorm = RMSNorm(D, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.mlp = SparseMoE(config)
        self.postnorm = config.postnorm
        if softmax:
            self.attn_alpha, self.attn_beta = config.full_attn_alpha, config.full_attn_beta
        else:
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha, config.linear_attn_beta
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha, config.mlp_beta

    @staticmethod
    def _residual(r: torch.Tensor, alpha: float, y: torch.Tensor, beta: float) -> torch.Tensor:
        """r * alpha + y * beta in one pass when beta == 1 (M1's value): y + alpha * r."""
        return torch.add(y if beta == 1.0 else y * beta, r, alpha=alpha)

    def forward(self, x: torch.Tensor, batch: _Batch) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = self._residual(h if self.postnorm else x, self.attn_alpha, self.self_attn(h, batch), self.attn_beta)
        h = self.post_attention_layernorm(x)
        return self._residual(h if self.postnorm else x, self.mlp_alpha, self.mlp(h), self.mlp_beta)


class M1Model(nn.Module):
    """Embedding, decoder layers, final norm: token ids -> normalised hidden states."""

    def __init__(self, config: M1Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor, batch: _Batch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and batch.cache is None
        for layer in self.layers:
            x = checkpoint(layer, x, batch, use_reentrant=False) if recompute else layer(x, batch)
        return self.norm(x)


def _segment_positions(lengths: torch.Tensor) -> torch.Tensor:
    """[sum(lengths)] position of every token inside its own sequence: 0..len-1 per sequence."""
    starts = torch.cumsum(lengths, 0) - lengths
    idx = torch.arange(int(lengths.sum()), device=lengths.device)
    return idx - torch.repeat_interleave(starts, lengths)


def _same_length_groups(bounds: list[tuple[int, int]], device) -> list[torch.Tensor]:
    """[m, L] token positions of the m non-empty sequences of each length L (packed layout)."""
    starts: dict[int, list[int]] = {}
    for a, b in bounds:
        if b > a:
            starts.setdefault(b - a, []).append(a)
    return [torch.tensor(s, device=device)[:, None] + torch.arange(n, device=device) for n, s in starts.items()]


def _check_cu_seqlens(cu_seqlens: torch.Tensor, T: int) -> list[tuple[int, int]]:
    cu = [int(c) for c in cu_seqlens.tolist()]
    if cu_seqlens.dim() != 1 or not cu or cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be a 1-D non-decreasing [N+1] tensor from 0 to T={T}, got {cu}")
    return list(zip(cu[:-1], cu[1:]))


class M1ForCausalLM(nn.Module):
    """The MiniMax-M1 causal LM. forward gives fp32 logits, or fp32 log-probs of `targets`.

    Weights may be bf16; RMSNorm, routing, lightning states and the LM head run in fp32.
    """

    def __init__(self, config: M1Config) -> None:
        super().__init__()
        self.config = config
        self.model = M1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ setup

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) matrices and ones for the norm weights (transformers' MiniMax initialisation)."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)  # drawn on the CPU

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each decoder layer in backward instead of storing its activations."""
        self.model.gradient_checkpointing = enabled

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(self, batch_size: int, max_length: int) -> HybridCache:
        return HybridCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device)

    # ---------------------------------------------------------------- forward

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: HybridCache | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] (padded positions: 0). Arguments as in forward."""
        hidden, unpack = self._run(input_ids, attention_mask, cu_seqlens, position_ids, cache)
        return unpack(hidden[0]) if unpack is not None else hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        temperature: float = 1.0,
        ignore_index: int = -100,
        return_entropy: bool = False,
        cache: HybridCache | None = None,
    ):
        """Runs the model.

        Args:
            input_ids: [B, T] int64 token ids.
            attention_mask: [B, T], 1 for tokens and 0 for padding (any pattern; rows are packed).
            cu_seqlens: [N+1] boundaries of the sequences of a packed batch (B == 1).
            position_ids: [B, T] RoPE positions; default 0.. per sequence (after the cached tokens).
            targets: [B, T] int64: when given, returns the log-prob of targets[b, t] given
                tokens 0..t (so usually input_ids shifted left by one); ignore_index and
                padded positions give 0.
            temperature: divides the logits before the log-softmax (targets only).
            return_entropy: also return the entropy of each position's distribution (targets only).
            cache: a HybridCache to continue (dense input) or to fill (packed/padded, empty cache).

        Returns:
            logits [B, T, V] float32; or, with targets, log-probs [B, T] float32
            (and entropy [B, T] float32 when return_entropy).
        """
        hidden, unpack = self._run(input_ids, attention_mask, cu_seqlens, position_ids, cache)
        flat = hidden.reshape(-1, hidden.shape[-1])  # [tokens, D]
        weight = self.lm_head.weight
        if targets is None:
            out = ops.fp32_logits(flat, weight)
            return unpack(out) if unpack is not None else out.view(*hidden.shape[:2], -1)
        if targets.shape != input_ids.shape:
            raise ValueError(f"targets must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(targets.shape)}")
        t = targets[attention_mask.bool()] if unpack is not None else targets.reshape(-1)
        res = ops.fp32_logprobs(flat, weight, t, temperature=temperature, ignore_index=ignore_index,
                                return_entropy=return_entropy)
        shape = hidden.shape[:2]
        outs = res if return_entropy else (res,)
        outs = tuple(unpack(o) if unpack is not None else o.view(shape) for o in outs)
        return outs if return_entropy else outs[0]

    def _run(self, input_ids, attention_mask, cu_seqlens, position_ids, cache):
        """Hidden states in the layout the layers run on, and how to scatter them back to [B, T, ...]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(
                f"position_ids must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(position_ids.shape)}"
            )
        B, T = input_ids.shape
        unpack = None
        if attention_mask is not None:
            if cu_seqlens is not None:
                raise ValueError("give attention_mask (padded batch) or cu_seqlens (packed batch), not both")
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.bool()
            if not bool(mask.all()):
                keep = mask.reshape(-1).nonzero().squeeze(1)  # [tokens]: row-major order keeps each row's order
                lengths = mask.sum(1)
                cu_seqlens = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
                input_ids = input_ids.reshape(-1)[keep][None]
                if position_ids is not None:
                    position_ids = position_ids.reshape(-1)[keep][None]

                def unpack(t: torch.Tensor) -> torch.Tensor:  # [tokens, ...] -> [B, T, ...]
                    full = t.new_zeros(B * T, *t.shape[1:])
                    return full.index_copy(0, keep, t).view(B, T, *t.shape[1:])

        bounds = None
        if cu_seqlens is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"cu_seqlens needs a packed batch with B == 1, got B = {input_ids.shape[0]}")
            bounds = _check_cu_seqlens(cu_seqlens, input_ids.shape[1])
            lengths = torch.tensor([b - a for a, b in bounds], dtype=torch.long, device=input_ids.device)
            if position_ids is None:
                position_ids = _segment_positions(lengths)[None]
            if cache is not None:
                if not cache.is_empty() or cache.batch_size != len(bounds):
                    raise ValueError(
                        f"a packed/padded batch fills an empty cache of batch size {len(bounds)}; got a cache of "
                        f"batch size {cache.batch_size} holding {cache.lengths.tolist()} tokens"
                    )
        elif cache is not None:
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(f"cache holds {cache.batch_size} sequences but input_ids has {input_ids.shape[0]} rows")
            cache_pos = cache.positions(input_ids.shape[1])
            position_ids = cache_pos if position_ids is None else position_ids
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)

        cos = sin = None
        if self.config.softmax_layers:
            cos, sin = rope_tables(position_ids, self.config.rotary_dim, self.config.rope_theta)
        positions = cache_pos if cache is not None and bounds is None else position_ids
        same_length = _same_length_groups(bounds, input_ids.device) if bounds is not None else None
        batch = _Batch(cos=cos, sin=sin, cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
                       bounds=bounds, same_length=same_length, cache=cache, positions=positions)
        hidden = self.model(input_ids, batch)
        if cache is not None:
            if bounds is not None:
                cache.lengths.copy_(lengths)
            else:
                cache.lengths += input_ids.shape[1]
        return hidden, unpack

    # --------------------------------------------------------- checkpoints, generation

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> "M1ForCausalLM":
        """Loads config.json + safetensors (single file or sharded); see m1model.checkpoint."""
        from m1model.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        """Writes config.json + safetensors that transformers' MiniMaxForCausalLM loads; see m1model.checkpoint."""
        from m1model.checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)

    def generate(self, prompts, **kwargs):
        """Samples continuations with a hybrid cache; see m1model.generation.generate."""
        from m1model.generation import generate

        return generate(self, prompts, **kwargs)
