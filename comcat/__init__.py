"""comcat: head-level low-rank compression and customization of attention models (COMCAT, ICML 2023).

The names below are imported on first use (PEP 562), so `python -m comcat --help` starts without torch.
"""
import sys
import types
from importlib import import_module

from .errors import ComcatError

_EXPORTS = {
    "analysis": ("Spectra", "analyze", "product_svd"),
    "compress": ("compress",),
    "cost": ("count_params", "measure_latency", "model_flops", "model_params"),
    "io": ("load_compressed", "save_compressed"),
    "lowrank": ("HeadLowRankAttention", "LowRankLinear", "MatrixLowRankAttention"),
    "models": ("Loaded", "load_model"),
    "ranks": ("RankConfig", "energy_ranks", "energy_ranks_for_budget", "uniform_ranks"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["ComcatError", *_WHERE]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'comcat' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`comcat.compress` is the function, although a submodule has the same name (importing the
    submodule would otherwise rebind the package attribute to it)."""

    @property
    def compress(self):
        return import_module(".compress", __name__).compress

    @compress.setter
    def compress(self, submodule) -> None:      # the import system sets the submodule here: keep the function
        pass


sys.modules[__name__].__class__ = _Package
