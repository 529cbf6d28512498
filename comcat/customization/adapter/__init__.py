"""COMCAT attention adapters for diffusers UNets: a per-head rank-r update of W^QK and W^VO.

config.py (what an adapter is), layer.py (the attention processor), model.py (injection,
save/load, scales, unload) - laid out like peft's tuners.
"""

from .config import AdapterConfig
from .layer import ComcatAttnProcessor, HeadLowRank, SharedHeadLowRank
from .model import (
    adapter_names,
    adapter_parameters,
    add_adapter,
    load_adapter,
    save_adapter,
    set_adapter_scale,
    unload_adapter,
)

__all__ = [
    "AdapterConfig",
    "ComcatAttnProcessor",
    "HeadLowRank",
    "SharedHeadLowRank",
    "add_adapter",
    "adapter_names",
    "adapter_parameters",
    "load_adapter",
    "save_adapter",
    "set_adapter_scale",
    "unload_adapter",
]
