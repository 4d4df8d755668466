"""Calling the m1 ops from your own PyTorch model: a runnable example.

    python -m m1ops.examples

A two-layer toy language model written from scratch (not m1model) that uses
every op the way a custom model would:

  LightningMixer  m1ops.lightning_attn over a packed batch (cu_seqlens), with a
                  carried initial state and the final state returned, then
                  m1ops.lightning_attn_decode for one token at a time from it;
  MoEFFN          m1ops.moe_route (softmax top-k) + m1ops.fused_moe;
  ToyLM           m1ops.fp32_logprobs for the training loss (no [N, V] logits),
                  m1ops.fp32_logits for sampling the next token.

Shapes: N sequences packed along T (batch dim 1), D model dim, H heads, Dh
head dim, E experts, k experts per token, Vocab vocabulary.
main() trains one step on a packed batch and checks that a prefill followed by
decode steps gives the same log-probabilities as one forward over the whole
text; tests/test_examples.py runs it and compares every layer with
m1ops.reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import m1ops


class LightningMixer(nn.Module):
    """Token mixing by lightning attention: qkv = silu(x W^T), per-head decay slopes, out_proj."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)
        # [H] float32 decay rates (>= 0): head h forgets at exp(-slope_h) per token. A buffer, not a
        # parameter: lightning_attn has no gradient for slope.
        self.register_buffer("slope", 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D] -> q, k, v [..., H, Dh]: views of one projection (their last dim is contiguous,
        which is all the kernels need)."""
        qkv = F.silu(self.qkv(x)).unflatten(-1, (self.heads, 3 * self.head_dim))
        return qkv.split(self.head_dim, dim=-1)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, state: torch.Tensor | None = None):
        """x [1, T, D] packed sequences; cu_seqlens [N + 1]; state [N, H, Dh, Dh] float32 to continue
        from (None: zeros). Returns (y [1, T, D], final state [N, H, Dh, Dh] float32)."""
        q, k, v = self._qkv(x)
        o, final = m1ops.lightning_attn(q, k, v, self.slope, scale=1.0, initial_state=state,
                                        output_final_state=True, cu_seqlens=cu_seqlens)
        return self.out(o.flatten(-2)), final

    def step(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """One token per sequence: x [N, D]; state [N, H, Dh, Dh] float32 contiguous, updated in place."""
        q, k, v = self._qkv(x)
        return self.out(m1ops.lightning_attn_decode(q, k, v, self.slope, state, scale=1.0).flatten(-2))


class MoEFFN(nn.Module):
    """Top-k mixture of SwiGLU experts; weights in the layout fused_moe takes."""

    def __init__(self, dim: int, ffn: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, experts, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(experts, 2 * ffn, dim) / dim**0.5)  # rows: gate, then up
        self.w_down = nn.Parameter(torch.randn(experts, dim, ffn) / ffn**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        flat = x.reshape(-1, x.shape[-1])  # [tokens, D]: fused_moe takes 2-D input
        weights, ids = m1ops.moe_route(self.router(flat), self.top_k)  # [tokens, k] float32, int64
        return m1ops.fused_moe(flat, self.w_gate_up, self.w_down, weights, ids).view_as(x)


class ToyLM(nn.Module):
    """embedding -> (x + mixer(norm x), x + moe(norm x)) -> norm -> FP32 head."""

    def __init__(self, vocab: int = 97, dim: int = 32, heads: int = 2, head_dim: int = 16, ffn: int = 24,
                 experts: int = 4, top_k: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2, self.norm_out = nn.RMSNorm(dim), nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.mixer = LightningMixer(dim, heads, head_dim)
        self.moe = MoEFFN(dim, ffn, experts, top_k)
        self.head = nn.Parameter(torch.randn(vocab, dim) / dim**0.5)  # [Vocab, D]

    def hidden(self, ids: torch.Tensor, cu_seqlens: torch.Tensor, state: torch.Tensor | None = None):
        """ids [1, T] packed -> (hidden [T, D], final lightning state [N, H, Dh, Dh])."""
        x = self.embed(ids)
        mixed, final = self.mixer(self.norm1(x), cu_seqlens, state)
        x = x + mixed
        x = x + self.moe(self.norm2(x))
        return self.norm_out(x)[0], final

    def logprobs(self, ids: torch.Tensor, cu_seqlens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[t] | tokens <= t) [T] float32, never materialising the [T, Vocab] logits."""
        hidden, _ = self.hidden(ids, cu_seqlens)
        return m1ops.fp32_logprobs(hidden, self.head, targets)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cu_seqlens: torch.Tensor):
        """Packed prompts -> (fp32 logits [N, Vocab] of each prompt's last token, states [N, H, Dh, Dh])."""
        hidden, state = self.hidden(ids, cu_seqlens)
        return m1ops.fp32_logits(hidden[cu_seqlens[1:] - 1], self.head), state

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """tokens [N] (one per sequence) -> fp32 logits [N, Vocab]; state advances in place."""
        x = self.embed(tokens)
        x = x + self.mixer.step(self.norm1(x), state)
        x = x + self.moe(self.norm2(x))
        return m1ops.fp32_logits(self.norm_out(x), self.head)


def packed(lengths: list[int], vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [1, sum(lengths)] and cu_seqlens [N + 1] int64."""
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=generator)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return ids, cu


def main() -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ToyLM()
    vocab = model.head.shape[0]

    # Training step on a packed batch: targets are the next token within each sequence, -100 at the ends.
    lengths = [9, 1, 22]
    ids, cu = packed(lengths, vocab, gen)
    targets = torch.roll(ids[0], -1).clone()
    targets[cu[1:] - 1] = -100
    logp = model.logprobs(ids, cu, targets)
    loss = -logp.sum() / (targets != -100).sum()
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # Generation: prefill the prompts, then decode greedily; the log-probs of the generated tokens must be
    # those of one forward over prompt + continuation (the decode path continues the prefill's state).
    prompts = [5, 3]
    ids, cu = packed(prompts, vocab, gen)
    logits, state = model.prefill(ids, cu)
    generated = []
    for _ in range(4):
        token = logits.argmax(-1)
        generated.append(token)
        logits = model.decode(token, state)
    steps = torch.stack(generated, 1)  # [N, steps]
    step_logp = torch.log_softmax(logits, -1)  # the distribution after the last generated token

    full = [torch.cat([ids[0, cu[n]:cu[n + 1]], steps[n]]) for n in range(len(prompts))]
    full_ids, full_cu = packed([len(f) for f in full], vocab, gen)
    full_ids[0] = torch.cat(full)
    with torch.no_grad():
        hidden, _ = model.hidden(full_ids, full_cu)
        last = m1ops.fp32_logits(hidden[full_cu[1:] - 1], model.head)
    gap = (torch.log_softmax(last, -1) - step_logp).abs().max().item()
    result = {"loss": loss.item(), "grads_finite": bool(grads_finite), "generated": steps.tolist(),
              "decode_vs_forward_max_logprob_gap": gap}
    return result


if __name__ == "__main__":
    for key, value in main().items():
        print(f"{key}: {value}")
