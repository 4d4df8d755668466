"""m1model: the MiniMax-M1 architecture on m1 ops (DESIGN 5).

    from m1model import M1Config, M1ForCausalLM
    model = M1ForCausalLM.from_pretrained("path/to/checkpoint", dtype=torch.bfloat16)
    out = model.generate([[1, 2, 3]], max_new_tokens=32)

m1model.ops switches every op between the m1ops kernels and pure-PyTorch references.
"""

from m1model.cache import HybridCache
from m1model.checkpoint import CheckpointError
from m1model.config import PRESETS, ConfigError, M1Config
from m1model.generation import GenerationOutput
from m1model.model import M1ForCausalLM

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "GenerationOutput",
    "HybridCache",
    "M1Config",
    "M1ForCausalLM",
]
