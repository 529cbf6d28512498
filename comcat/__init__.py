"""comcat: head-level low-rank compression and customization of attention models (COMCAT, ICML 2023).

The names below are imported on first use (PEP 562), so `python -m comcat --help` starts without torch.
"""

from importlib import import_module

from .core.errors import ComcatError

_EXPORTS = {
    "compression.analysis": ("Spectra", "analyze"),
    "compression.convert": ("compress",),
    "compression.cost": ("count_params", "measure_latency", "model_flops", "model_params"),
    "compression.format": ("load_compressed", "save_compressed"),
    "compression.load": ("load_model",),
    "compression.lowrank": ("HeadLowRankAttention", "LowRankLinear", "MatrixLowRankAttention"),
    "compression.models": ("Loaded",),
    "compression.rank_rules": ("energy_ranks", "energy_ranks_for_budget", "uniform_ranks"),
    "compression.ranks": ("RankConfig",),
    "core.linalg": ("product_svd",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["ComcatError", *_WHERE]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'comcat' has no attribute {name!r}")
