"""m1ops.flops: FlopCounterMode sees every m1 op, each formula matches a hand count, and
the counter on a real m1model forward agrees with bench/flops.py's analytic model.

Hand counts list the products each kernel runs as (m, n, k) GEMM shapes and add
2 m n k per product, torch's convention for a multiply-add."""

from __future__ import annotations

import pytest
import torch
from helpers import load_bench
from torch.utils.flop_counter import FlopCounterMode

import m1ops
from m1model import M1Config, M1ForCausalLM
from m1model.config import FULL, LINEAR
from m1model.model import lightning_block_size


@pytest.fixture(scope="module")
def flops_model():
    return load_bench("flops")


def gemms(*shapes: tuple[int, int, int]) -> int:
    return sum(2 * m * n * k for m, n, k in shapes)


def counted(fn) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def lightning_hand_count(blocks: list[int], K: int, V: int, backward: bool) -> int:
    """Per block of n tokens, the kernels' products (prefill_cpu_pass.h, prefill_bwd_cpu.cpp)."""
    total = 0
    for n in blocks:
        fwd = [(n, n, K), (n, V, n), (n, V, K), (K, V, n)]  # Q K^T, A V, Q S, K^T V
        if backward:
            dq = [(n, n, V), (n, K, n), (n, K, V), (V, K, n)]  # dO V^T, A K, dO S^T, state
            dkdv = [(n, n, K), (n, n, V), (n, K, n), (n, V, n), (n, K, V), (n, V, K), (K, V, n)]
            total += gemms(*dq, *dkdv)
        else:
            total += gemms(*fwd)
    return total


@pytest.mark.parametrize("cu, blocks", [(None, [4, 4, 2]), ([0, 3, 3, 10], [3, 4, 3])])
def test_lightning_prefill_formulas(cu, blocks):
    # T = 10, block 4: three blocks (4, 4, 2); packed as lengths 3, 0, 7: blocks (3), (4, 3).
    H, K, V = 2, 3, 5
    q = torch.randn(1, 10, H, K, requires_grad=True)
    k = torch.randn(1, 10, H, K, requires_grad=True)
    v = torch.randn(1, 10, H, V, requires_grad=True)
    slope = torch.rand(H)
    cu_seqlens = None if cu is None else torch.tensor(cu)

    def run():
        o, _ = m1ops.lightning_attn(q, k, v, slope, cu_seqlens=cu_seqlens, block_size=4)
        o.sum().backward()

    counts = counted(run)
    assert counts["m1._lightning_attn_fwd"] == H * lightning_hand_count(blocks, K, V, backward=False)
    assert counts["m1._lightning_attn_bwd"] == H * lightning_hand_count(blocks, K, V, backward=True)


def test_lightning_default_block_and_decode_formula():
    H, K, V = 2, 4, 6
    q, k = torch.randn(3, 70, H, K), torch.randn(3, 70, H, K)
    v, slope = torch.randn(3, 70, H, V), torch.rand(H)
    counts = counted(lambda: m1ops.lightning_attn(q, k, v, slope))  # CPU default block 64: blocks 64, 6
    assert counts["m1._lightning_attn_fwd"] == 3 * H * lightning_hand_count([64, 6], K, V, backward=False)

    state = torch.zeros(3, H, K, V)
    counts = counted(lambda: m1ops.lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], slope, state))
    # per (sequence, head): k^T v into the state [K, 1] x [1, V], q S [1, K] x [K, V]
    assert counts["m1.lightning_attn_decode"] == 3 * H * gemms((K, V, 1), (1, V, K))


def test_moe_formulas():
    T, D, F, E, k = 7, 12, 10, 4, 2
    x = torch.randn(T, D, requires_grad=True)
    w_gate_up = torch.randn(E, 2 * F, D, requires_grad=True)
    w_down = torch.randn(E, D, F, requires_grad=True)
    weights, ids = m1ops.moe_route(torch.randn(T, E), k)
    pairs = T * k
    fwd = gemms((pairs, 2 * F, D), (pairs, D, F))  # x W_gate_up^T, h W_down^T
    # dh = dy W_down, dW_down = dy^T h, dW_gate_up = dgu^T x, dx = dgu W_gate_up
    bwd = gemms((pairs, F, D), (D, F, pairs), (2 * F, D, pairs), (pairs, D, 2 * F))

    counts = counted(lambda: m1ops.fused_moe(x, w_gate_up, w_down, weights, ids).sum().backward())
    assert counts["m1.fused_moe"] == fwd
    assert counts["m1.fused_moe_backward"] == bwd  # autograd passes the saved gate/up pre-activations

    grad_y = torch.randn(T, D)
    counts = counted(lambda: m1ops.fused_moe_backward(grad_y, x.detach(), w_gate_up.detach(), w_down.detach(),
                                                      weights, ids, None))
    assert counts["m1.fused_moe_backward"] == bwd + gemms((pairs, 2 * F, D))  # + recomputed gate/up


@pytest.mark.parametrize("want_weight", [True, False])
def test_logits_head_formulas(want_weight):
    N, D, V = 5, 8, 33
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=want_weight)
    targets = torch.tensor([0, 3, -100, 32, 7])
    z = gemms((N, V, D))
    grads = 1 + int(want_weight)  # dhidden = G W, dweight = G^T hidden

    counts = counted(lambda: m1ops.fp32_logprobs(hidden, weight, targets).sum().backward())
    assert counts["m1.fp32_logprobs"] == z
    assert counts["m1._fp32_logprobs_backward"] == z + grads * z  # z recomputed, then the gradients

    counts = counted(lambda: m1ops.fp32_logits(hidden, weight).sum().backward())
    assert counts["m1.fp32_logits"] == z
    assert counts["m1._fp32_logits_backward"] == grads * z


def reduced_m1() -> M1Config:
    """minimax-m1's shape (7 lightning : 1 softmax, GQA, partial RoPE, MoE top-2) at toy sizes."""
    layers = tuple(FULL if (i + 1) % 8 == 0 else LINEAR for i in range(8))
    return M1Config.preset(
        "minimax-m1", vocab_size=300, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, layer_types=layers, intermediate_size=48, num_local_experts=8,
        num_experts_per_tok=2, rotary_dim=8, block_size=16,
    )


@pytest.mark.parametrize("layout", ["dense", "packed"])
def test_model_forward_matches_the_analytic_count(flops_model, layout):
    cfg = reduced_m1()
    torch.manual_seed(0)
    model = M1ForCausalLM(cfg).eval()
    # The kernels run their own block (64 on the CPU), not the config's 16: blocks 64, 64, 22 for a
    # sequence of 150 tokens; packed lengths 5, 140, 67: blocks (5), (64, 64, 12), (64, 3).
    block = lightning_block_size(cfg.block_size, model.device)
    assert block == m1ops.lightning.DEFAULT_BLOCK_SIZE["cpu"] != cfg.block_size
    if layout == "dense":
        ids, kwargs, lens = torch.randint(0, cfg.vocab_size, (2, 150)), {}, [150, 150]
    else:
        lens = [5, 140, 67]
        ids, kwargs = torch.randint(0, cfg.vocab_size, (1, sum(lens))), {"cu_seqlens": torch.tensor([0, 5, 145, 212])}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, **kwargs)
    measured = counter.get_total_flops()
    parts = flops_model.m1_prefill_flops(cfg, lens, block_size=block)
    expected = sum(parts.values())
    assert measured == pytest.approx(expected, rel=0.01)
    # Every component is seen by the counter: the lightning core and the head are
    # large enough here that dropping either would break the 1% agreement.
    assert min(parts["lightning core"], parts["head"], parts["softmax core"]) > 0.01 * expected
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert by_op["m1._lightning_attn_fwd"] == parts["lightning core"]
    assert by_op["m1.fp32_logits"] == parts["head"]


def test_lightning_formula_under_fake_tensors():
    # No values to read: the packed tokens count as one sequence (documented in m1ops/flops.py).
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.randn(1, 100, 2, 8)
        cu = torch.tensor([0, 40, 100])
        with FlopCounterMode(display=False) as counter:
            m1ops.lightning_attn(q, q, q, torch.rand(2), cu_seqlens=cu, block_size=16)
    assert counter.get_total_flops() == 2 * lightning_hand_count([16] * 6 + [4], 8, 8, backward=False)
