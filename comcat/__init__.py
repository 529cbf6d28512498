"""comcat: head-level low-rank compression and customization of attention models (COMCAT, ICML 2023)."""
from .analysis import Spectra, analyze, product_svd
from .compress import compress
from .cost import count_params, measure_latency, model_flops, model_params
from .errors import ComcatError
from .io import load_compressed, save_compressed
from .lowrank import HeadLowRankAttention, LowRankLinear, MatrixLowRankAttention
from .models import Loaded, load_model
from .ranks import RankConfig, energy_ranks, energy_ranks_for_budget, uniform_ranks

__all__ = ["Spectra", "analyze", "product_svd", "compress", "count_params", "measure_latency", "model_flops",
           "model_params", "ComcatError", "load_compressed", "save_compressed", "HeadLowRankAttention",
           "LowRankLinear", "MatrixLowRankAttention", "Loaded", "load_model", "RankConfig", "energy_ranks",
           "energy_ranks_for_budget", "uniform_ranks"]
__version__ = "0.1.0"
