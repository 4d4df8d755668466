"""m1ops: the compute core of MiniMax-M1 as torch.ops.m1 kernels.

Every op has a CPU kernel (C++), a CUDA kernel where one is built, a fake impl
for torch.compile, and a float64 reference in m1ops.reference.
"""

from m1ops._build import build_info, load_extension

load_extension()  # before any torch.library call: the schemas live in _C

from m1ops.lightning import lightning_attn, lightning_attn_decode  # noqa: E402
from m1ops.logits import fp32_logits, fp32_logprobs  # noqa: E402
from m1ops.moe import fused_moe, fused_moe_backward, moe_route  # noqa: E402
from m1ops.norm import rms_norm  # noqa: E402
from m1ops import flops  # noqa: E402,F401  registers the ops' FLOP formulas with torch.utils.flop_counter

__all__ = [
    "build_info",
    "lightning_attn",
    "lightning_attn_decode",
    "fused_moe",
    "fused_moe_backward",
    "moe_route",
    "fp32_logprobs",
    "fp32_logits",
    "rms_norm",
]
