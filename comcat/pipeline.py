"""The compress job: choose ranks, convert, measure, report."""
from __future__ import annotations

from dataclasses import replace

from .compress import compress
from .cost import count_params, layer_params, measure_latency, model_flops, model_params
from .errors import ComcatError
from .evaluate import evaluate
from .models import Loaded
from .ranks import METHODS, RankConfig, energy_ranks, energy_ranks_for_budget, greedy_energy_ranks, uniform_ranks

ALLOCATIONS = ("uniform", "energy", "greedy")


def choose_ranks(loaded: Loaded, method: str, ranks: str | None = None, energy: float | None = None,
                 params_ratio: float | None = None, allocate: str = "uniform", mlp: bool = False,
                 classifier_rank: int | None = None) -> RankConfig:
    """Exactly one rule: a rank file, an energy threshold, or a parameter ratio (uniform or energy-allocated)."""
    if method not in METHODS:
        raise ComcatError(f"method must be one of {METHODS}, got {method!r}")
    if sum(x is not None for x in (ranks, energy, params_ratio)) != 1:
        raise ComcatError("give exactly one of --ranks FILE, --energy E or --params-ratio R")
    if loaded.compressed:
        raise ComcatError(f"{loaded.source} is already compressed: compress the dense model instead")
    model = loaded.model
    if ranks is not None:
        cfg = RankConfig.load(ranks)
        if cfg.method != method:
            raise ComcatError(f"rank file is for method {cfg.method!r} but --method is {method!r}: make them agree")
    elif energy is not None:
        cfg = energy_ranks(model, method, energy, mlp=mlp)
    elif allocate == "energy":
        cfg = energy_ranks_for_budget(model, method, params_ratio, mlp=mlp)
    elif allocate == "greedy":
        cfg = greedy_energy_ranks(model, method, params_ratio, mlp=mlp)
    elif allocate == "uniform":
        cfg = uniform_ranks(model, method, params_ratio, mlp=mlp)
    else:
        raise ComcatError(f"allocation must be one of {ALLOCATIONS}, got {allocate!r}")
    if classifier_rank is not None:
        cfg = replace(cfg, head=classifier_rank)
    return cfg.validate(model)


def run_compress(loaded: Loaded, cfg: RankConfig, data=None, evaluate_top1: bool = True,
                 latency: bool = True, device: str = "cpu", progress: bool = True,
                 dense_top1: dict | None = None) -> tuple[Loaded, dict]:
    """Compress `loaded` with `cfg`; returns the compressed model and a report (params, FLOPs,
    per-layer params, top-1 dense vs compressed, CPU latency at batch 1 and 32).
    `dense_top1`: the dense model's evaluate() result on the same data, when already known."""
    dense = loaded.model
    small = compress(dense, cfg)
    report = {
        "method": cfg.method, "ranks": cfg.to_dict(),
        "dense": {"params": count_params(dense), "flops": model_flops(dense)},
        "compressed": {"params": count_params(small), "flops": model_flops(dense, cfg)},
        "layers": {"dense": layer_params(dense), "compressed": layer_params(dense, cfg)},
    }
    assert report["compressed"]["params"] == model_params(dense, cfg)
    dense_attn = sum(l["attn"] for l in report["layers"]["dense"])
    report["attn_params_ratio"] = sum(l["attn"] for l in report["layers"]["compressed"]) / dense_attn
    report["params_ratio"] = report["compressed"]["params"] / report["dense"]["params"]
    report["flops_ratio"] = report["compressed"]["flops"] / report["dense"]["flops"]
    if evaluate_top1:
        report["dense"].update(dense_top1 or evaluate(dense, data, device=device, progress=progress))
        report["compressed"].update(evaluate(small, data, device=device, progress=progress))
    if latency:
        for key, m in (("dense", dense), ("compressed", small)):
            report[key]["latency_ms"] = {f"cpu_b{b}": round(measure_latency(m, b, device="cpu"), 3) for b in (1, 32)}
    return Loaded(small, loaded.arch, loaded.arch_kwargs, loaded.source), report


def format_report(report: dict) -> str:
    """A small fixed-width table of a compress report."""
    rows = [("", "dense", "compressed", "ratio")]
    d, c = report["dense"], report["compressed"]
    rows.append(("params", f"{d['params']:,}", f"{c['params']:,}", f"{c['params'] / d['params']:.3f}"))
    rows.append(("FLOPs/img", f"{d['flops'] / 1e6:,.1f}M", f"{c['flops'] / 1e6:,.1f}M", f"{c['flops'] / d['flops']:.3f}"))
    if "top1" in d:
        rows.append(("top-1 %", f"{d['top1']:.2f}", f"{c['top1']:.2f}", f"{c['top1'] - d['top1']:+.2f}"))
    for k in d.get("latency_ms", {}):
        rows.append((f"ms {k}", f"{d['latency_ms'][k]:.2f}", f"{c['latency_ms'][k]:.2f}",
                     f"{c['latency_ms'][k] / d['latency_ms'][k]:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    return f"method {report['method']}, attention params {report['attn_params_ratio']:.1%} of dense\n" + "\n".join(lines)
