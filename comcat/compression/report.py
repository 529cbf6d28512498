"""What a compressed model costs and keeps against its dense model: the report of a compress run."""

from __future__ import annotations

from dataclasses import replace

import torch

from .convert import compress
from .cost import compare_latency, count_params, layer_params, model_flops, model_params
from .evaluate import fidelity, predict, scores
from .models import Loaded, has_classifier
from .ranks import RankConfig


def run_compress(
    loaded: Loaded,
    cfg: RankConfig,
    data=None,
    evaluate_top1: bool = True,
    latency: bool = True,
    device: str = "cpu",
    progress: bool = True,
    dense_scores: dict | None = None,
) -> tuple[Loaded, dict]:
    """Compress `loaded` with `cfg` by plain SVD; returns the compressed model and its report (measure_report)."""
    small = compress(loaded.model, cfg)
    report = measure_report(loaded.model, small, data, evaluate_top1, latency, device, progress, dense_scores)
    return replace(loaded, model=small), report


def measure_report(
    dense,
    small,
    data=None,
    evaluate_top1: bool = True,
    latency: bool = True,
    device: str = "cpu",
    progress: bool = True,
    dense_scores: dict | None = None,
) -> dict:
    """Dense vs compressed: params, FLOPs, per-layer params; on `data` (held-out images) top-1 when
    they carry the model's labels, and the compressed model's agreement with the dense one (same
    top-1, %) and mean KL(dense || compressed); latency at batch 1 and 32 on the CPU (and CUDA when
    present), dense and compressed timed in alternating rounds (median and range). `small.comcat_ranks`
    is the rank config; `dense_scores`: the dense model's scores on `data` with its 'logits', when known."""
    cfg = small.comcat_ranks
    report = {
        "method": cfg.method,
        "ranks": cfg.to_dict(),
        "dense": {"params": count_params(dense), "flops": model_flops(dense)},
        "compressed": {"params": count_params(small), "flops": model_flops(dense, cfg)},
        "layers": {"dense": layer_params(dense), "compressed": layer_params(dense, cfg)},
    }
    if report["compressed"]["params"] != model_params(dense, cfg):
        raise AssertionError("analytic and counted parameters disagree")
    dense_attn = sum(l["attn"] for l in report["layers"]["dense"])
    report["attn_params_ratio"] = sum(l["attn"] for l in report["layers"]["compressed"]) / dense_attn
    report["params_ratio"] = report["compressed"]["params"] / report["dense"]["params"]
    report["flops_ratio"] = report["compressed"]["flops"] / report["dense"]["flops"]
    if cfg.method == "head":
        from .diagnose import head_errors

        report["heads_lost_most"] = head_errors(dense, small)[:5]  # weight-space error, largest first
    if evaluate_top1:
        embeddings = not has_classifier(dense)
        if dense_scores is None:
            ref, labels = predict(dense, data, device=device, progress=progress)
            dense_scores = {**scores(ref, labels, embeddings=embeddings), "logits": ref}
        ref = dense_scores["logits"]
        report["dense"].update({k: v for k, v in dense_scores.items() if k != "logits"})
        logits, labels = predict(small, data, device=device, progress=progress)
        report["compressed"].update(scores(logits, labels, ref, embeddings=embeddings))
        report["embeddings"] = embeddings
        report["labeled"] = "top1" in report["dense"]
    if latency:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        timing = {}
        for d in devices:
            for b in (1, 32):
                t = compare_latency({"dense": dense, "compressed": small}, b, device=d)
                timing[f"{d}_b{b}"] = t
        for key in ("dense", "compressed"):
            report[key]["latency_ms"] = {k: round(t[key]["ms"], 3) for k, t in timing.items()}
            report[key]["latency_range_ms"] = {
                k: [round(t[key]["min"], 3), round(t[key]["max"], 3)] for k, t in timing.items()
            }
        report["latency_ratio"] = {
            k: {
                "median": round(t["compressed"]["ratio"], 4),
                "range": [round(t["compressed"]["ratio_min"], 4), round(t["compressed"]["ratio_max"], 4)],
            }
            for k, t in timing.items()
        }
        dense.to(device)
        small.to(device)
    return report


def format_report(report: dict) -> str:
    """A small fixed-width table of a compress report."""
    rows = [("", "dense", "compressed", "ratio")]
    d, c = report["dense"], report["compressed"]
    rows.append(("params", f"{d['params']:,}", f"{c['params']:,}", f"{c['params'] / d['params']:.3f}"))
    rows.append(
        ("FLOPs/img", f"{d['flops'] / 1e6:,.1f}M", f"{c['flops'] / 1e6:,.1f}M", f"{c['flops'] / d['flops']:.3f}")
    )
    if "top1" in d and "top1" in c:
        rows.append(("top-1 %", f"{d['top1']:.2f}", f"{c['top1']:.2f}", f"{c['top1'] - d['top1']:+.2f}"))
    if "agreement" in c:
        rows.append(("agrees w/ dense %", "100", f"{c['agreement']:.2f}", ""))
        rows.append(("KL to dense", "0", f"{c['kl']:.4f}", ""))
    if "cosine" in c:
        rows.append(("cosine to dense", "1", f"{c['cosine']:.4f}", ""))
        unit = report.get("data", {}).get("unit", "images")[:-1]
        rows.append((f"same nearest {unit} %", "100", f"{c['retrieval']:.2f}", ""))
    for k in d.get("latency_ms", {}):
        ratio = report.get("latency_ratio", {}).get(k)
        spread = f" ({ratio['range'][0]:.2f}-{ratio['range'][1]:.2f})" if ratio else ""
        rows.append(
            (
                f"ms {k}",
                f"{d['latency_ms'][k]:.2f}",
                f"{c['latency_ms'][k]:.2f}",
                f"{(ratio['median'] if ratio else c['latency_ms'][k] / d['latency_ms'][k]):.3f}{spread}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in rows]
    where = ""
    if "images" in c:
        data = report.get("data", {})
        where = (
            f"\nfigures on {c['images']} held-out evaluation {data.get('unit', 'images')}"
            + (f" of {data['source']}" if data.get("source") else "")
            + (
                " (no classifier: the fidelity of its pooled embeddings to the dense model's)"
                if report.get("embeddings")
                else ("" if report.get("labeled", True) else f" (no top-1: {data.get('note') or 'no labels'})")
            )
        )
    timing = (
        "\nlatency: median of 5 alternating rounds (ratio range in brackets); the machine's load moves it"
        if d.get("latency_ms")
        else ""
    )
    return (
        f"method {report['method']}, attention params {report['attn_params_ratio']:.1%} of dense\n"
        + "\n".join(lines)
        + where
        + timing
    )


FEW_VALIDATION = 100  # validation images below which choosing the best model is within noise


def noise_note(n: int) -> str:
    """What choosing the best model on `n` validation images is worth."""
    return (
        f"The best model was chosen by KL on {n} validation images: with so few, models a point or two "
        "apart are within noise (give more images for a surer choice)."
    )


def report_markdown(report: dict, source: str, heatmap: str | None = None) -> str:
    """The report.md of a compressed model: the table, then how the ranks were found and trained."""
    lines = ["# comcat compression report", "", f"Model: `{source}`", "", "```", format_report(report), "```", ""]
    if report.get("stopped"):
        lines += [
            f"**Stopped** during {report['stopped']}: this is the best valid model so far "
            "(`--resume` continues the run).",
            "",
        ]
    if report.get("calibration") and report["calibration"] != "none":
        lines += [
            f"Factors fitted to the layers' inputs on the training images ({report['calibration']} calibration).",
            "",
        ]
    s = report.get("search")
    if s:
        lines += [
            f"Rank search: {s['steps']}/{s['total']} steps, {s['budget']} budget {s['target']:,.0f}, "
            f"chosen ranks cost {s['cost']:,.0f}"
            + (" (the learned ranks were over budget and were lowered to fit)" if s["reduced_to_fit"] else "")
            + ".",
            "",
        ]
    dd = report.get("distill")
    if dd:
        lines += [
            f"Block-wise distillation: {dd['steps']}/{dd['total']} steps"
            + (
                ". It scored worse on the validation split than the model before it, which was kept instead"
                if dd.get("kept")
                else ""
            )
            + ".",
            "",
        ]
    v = report.get("validation", {})
    if v:
        parts = [f"after {k}: {fidelity(x, 1)}" for k, x in v.items() if "distance" in x or "kl" in x]
        n = next(iter(v.values()))["images"]
        lines += [
            f"Validation split (held out from training, {n} images): " + "; ".join(parts) + ".",
            "",
        ]
        if n < FEW_VALIDATION:
            lines += [noise_note(n), ""]
    f = report.get("finetune")
    if f:
        b = f["best"]
        lines += [
            f"End-to-end distillation: {f['steps']}/{f['total']} steps, best validation {fidelity(b)}.",
            "",
        ]
    if heatmap:
        lines += ["Chosen ranks per layer (fraction of full rank):", "", f"![ranks]({heatmap})", ""]
    return "\n".join(lines)
