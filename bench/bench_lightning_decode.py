"""Lightning attention decode step: m1 against the PyTorch recurrence.

    python bench/bench_lightning_decode.py [--device cpu] [--heads 64] [--batch 1 8]

Two PyTorch baselines, fp32 state:
  transformers  the decode step of transformers' MiniMax, out of place:
                state = ratio * state + k^T v; o = q @ state (allocates a new state
                every step, which is what most of its time goes to here);
  in-place      the fastest formulation we found in plain PyTorch: state.mul_(ratio),
                baddbmm_ for k^T v, bmm for q @ state; no large allocations.
A step is memory-bound, so the table also gives the state bandwidth achieved
(read + write of B*H*K*V fp32 values).
"""

from __future__ import annotations

import argparse

import torch
from common import print_table, time_ms, write_json

import m1ops


def transformers_decode_step(q, k, v, slope, state):
    """[B, H, K], [B, H, K], [B, H, V], [H], [B, H, K, V] -> (o [B, H, V], new state)."""
    ratio = torch.exp(-slope).view(1, -1, 1, 1)
    state = ratio * state + k.float().unsqueeze(-1) @ v.float().unsqueeze(-2)  # [B, H, K, V]
    o = (q.float().unsqueeze(-2) @ state).squeeze(-2)
    return o.to(v.dtype), state


def inplace_decode_step(q, k, v, slope, state):
    """Same math, state updated in place: returns o [B, H, V]."""
    B, H, K, V = state.shape
    ratio = torch.exp(-slope).view(1, -1, 1, 1)
    s = state.mul_(ratio).view(B * H, K, V).baddbmm_(k.float().reshape(B * H, K, 1), v.float().reshape(B * H, 1, V))
    return torch.bmm(q.float().reshape(B * H, 1, K), s).view(B, H, V).to(v.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128, help="K = V")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    rows = []
    H, D = args.heads, args.dim
    for B in args.batch:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(B, H, D, device=args.device).to(dtype) for _ in range(3))
            slope = torch.rand(H, device=args.device)
            state = torch.randn(B, H, D, D, device=args.device)
            ours = time_ms(lambda: m1ops.lightning_attn_decode(q, k, v, slope, state), repeat=50, min_time_s=0.5)
            hf = time_ms(lambda: transformers_decode_step(q, k, v, slope, state), repeat=20, min_time_s=0.5)
            inplace = time_ms(lambda: inplace_decode_step(q, k, v, slope, state), repeat=20, min_time_s=0.5)
            state_bytes = 2 * B * H * D * D * 4
            rows.append(dict(B=B, H=H, K=D, V=D, dtype=str(dtype).removeprefix("torch."), m1_us=ours * 1e3,
                             transformers_us=hf * 1e3, inplace_us=inplace * 1e3, vs_transformers=hf / ours,
                             vs_inplace=inplace / ours, m1_gbs=state_bytes / (ours * 1e-3) / 1e9))
    print_table(rows, [("B", "B", "d"), ("H", "H", "d"), ("K", "K=V", "d"), ("dtype", "dtype", "s"),
                       ("m1_us", "m1 us", ".1f"), ("transformers_us", "transformers us", ".1f"),
                       ("inplace_us", "in-place us", ".1f"), ("vs_transformers", "x transformers", ".1f"),
                       ("vs_inplace", "x in-place", ".1f"), ("m1_gbs", "m1 state GB/s", ".1f")])
    write_json("lightning_decode", {"device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
