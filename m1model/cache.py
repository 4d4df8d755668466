"""HybridCache: what generation keeps between steps (DESIGN 5).

Per sequence n of the batch:
- lightning layer l: the fp32 state S [H, Dh, Dh] after the tokens seen so far;
- softmax layer l: keys and values [Hkv, max_length, Dh] (model dtype), of which
  the first lengths[n] slots are filled.

Sequences have their own lengths (ragged batches are stored left-aligned, no
padding inside), so a new token of sequence n sits at position lengths[n].
Shapes: N sequences, H heads, Hkv KV heads, Dh head dim, T new tokens, L slots.
"""

from __future__ import annotations

import torch

from m1model.config import M1Config


class HybridCache:
    def __init__(
        self,
        config: M1Config,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        N, H, Hkv, Dh = batch_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.max_length = max_length
        self.lengths = torch.zeros(N, dtype=torch.long, device=device)  # tokens seen per sequence
        self.states = {l: torch.zeros(N, H, Dh, Dh, dtype=torch.float32, device=device) for l in config.linear_layers}
        self.keys = {l: torch.zeros(N, Hkv, max_length, Dh, dtype=dtype, device=device) for l in config.softmax_layers}
        self.values = {l: torch.zeros_like(t) for l, t in self.keys.items()}

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def is_empty(self) -> bool:
        return not bool(self.lengths.any())

    def positions(self, num_new: int) -> torch.Tensor:
        """[N, T] positions of the next num_new tokens of every sequence."""
        pos = self.lengths[:, None] + torch.arange(num_new, device=self.lengths.device)
        if pos.numel() and int(pos.max()) >= self.max_length:
            raise ValueError(
                f"HybridCache: {num_new} more tokens would exceed max_length={self.max_length} "
                f"(longest sequence has {int(self.lengths.max())})"
            )
        return pos

    def write_prompt(self, layer: int, n: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores the keys/values [T, Hkv, Dh] of sequence n's prompt in slots 0..T-1."""
        T = k.shape[0]
        if T > self.max_length:
            raise ValueError(f"HybridCache: a prompt of {T} tokens exceeds max_length={self.max_length}")
        self.keys[layer][n, :, :T] = k.transpose(0, 1)
        self.values[layer][n, :, :T] = v.transpose(0, 1)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Writes k, v [N, T, Hkv, Dh] at positions pos [N, T]; returns what the new queries attend to.

        Returns keys, values [N, Hkv, S, Dh] (S = 1 + the largest position) and the
        boolean mask [N, 1, T, S]: query t of sequence n sees slots 0..pos[n, t].
        """
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.keys[layer][rows, :, pos] = k.to(self.keys[layer].dtype)  # advanced index: [N, T, Hkv, Dh]
        self.values[layer][rows, :, pos] = v.to(self.values[layer].dtype)
        S = int(pos.max()) + 1
        mask = torch.arange(S, device=k.device)[None, None, :] <= pos[:, :, None]  # [N, T, S]
        return self.keys[layer][:, :, :S], self.values[layer][:, :, :S], mask[:, None]

    def select(self, index: torch.Tensor) -> None:
        """Keeps only the sequences `index` (e.g. drops finished ones), in that order."""
        self.lengths = self.lengths[index]
        self.states = {l: s[index] for l, s in self.states.items()}
        self.keys = {l: t[index] for l, t in self.keys.items()}
        self.values = {l: t[index] for l, t in self.values.items()}
