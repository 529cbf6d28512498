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
    dense_mlp = sum(l["mlp"] for l in report["layers"]["dense"])
    report["mlp_params_ratio"] = sum(l["mlp"] for l in report["layers"]["compressed"]) / max(dense_mlp, 1)
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


def weights_mb(model) -> float:
    """The size of the model's model.safetensors in MB (2^20 bytes), int8 weights as comcat stores them."""
    from safetensors.torch import save

    from .quantize import int8_state

    return len(save(int8_state(model))) / 2**20


@torch.no_grad()
def measure_int8(dense, small, small_int8, data=None, ref=None, labels=None, latency: bool = True) -> dict:
    """int8 beside float32, all measured in one run: the dense model and `small`, each as float32 and
    int8 (torchao, quantize.py). Per model: MB on disk, and on `data` its scores against the dense
    float32 logits `ref`; CPU latency of the four timed in alternating rounds (ratios to dense float32)."""
    import copy

    from .quantize import quantize_int8

    dense, small = dense.cpu().eval(), small.cpu().eval()
    models = {
        "dense": dense,
        "dense int8": quantize_int8(copy.deepcopy(dense)),
        "compressed": small,
        "compressed int8": small_int8.cpu().eval(),
    }
    out = {name: {"mb": weights_mb(m)} for name, m in models.items()}
    if data is not None:
        embeddings = not has_classifier(dense)
        if ref is None:
            ref, labels = predict(dense, data, device="cpu", progress=False)
        out["dense"].update({k: v for k, v in scores(ref, labels, embeddings=embeddings).items() if k == "top1"})
        for name in ("dense int8", "compressed", "compressed int8"):
            logits, _ = predict(models[name], data, device="cpu", progress=False)
            out[name].update(scores(logits, labels, ref, embeddings=embeddings))
    if latency:
        for b in (1, 32):
            t = compare_latency(models, b, device="cpu")
            for name in models:
                out[name][f"cpu_b{b}_ms"] = round(t[name]["ms"], 3)
                if name != "dense":
                    out[name][f"cpu_b{b}_ratio"] = [round(t[name][k], 4) for k in ("ratio", "ratio_min", "ratio_max")]
    return out


def format_int8(table: dict) -> str:
    """The int8 comparison as a fixed-width table."""
    cols = list(table)
    rows = [("", *cols), ("MB on disk", *(f"{table[c]['mb']:.2f}" for c in cols))]
    if all("top1" in table[c] for c in cols):
        rows.append(("top-1 %", *(f"{table[c]['top1']:.2f}" for c in cols)))
    if "agreement" in table[cols[-1]]:
        rows.append(("agrees w/ dense %", "100", *(f"{table[c]['agreement']:.2f}" for c in cols[1:])))
        rows.append(("KL to dense", "0", *(f"{table[c]['kl']:.4f}" for c in cols[1:])))
    for b in (1, 32):
        if f"cpu_b{b}_ms" in table["dense"]:
            rows.append((f"ms cpu_b{b}", *(f"{table[c][f'cpu_b{b}_ms']:.2f}" for c in cols)))
            rows.append(
                (
                    "  ratio (range)",
                    "1",
                    *(f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})" for r in (table[c][f"cpu_b{b}_ratio"] for c in cols[1:])),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    return "\n".join(r[0].ljust(widths[0]) + "".join(f"  {v:>{w}}" for v, w in zip(r[1:], widths[1:])) for r in rows)


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
    mlp = report.get("mlp_params_ratio")
    if report.get("int8"):
        where += (
            "\n\nint8 (torchao dynamic int8 linears) beside float32, measured in the same run"
            + (" on the same held-out images" if "agreement" in report["int8"].get("compressed int8", {}) else "")
            + ":\n"
            + format_int8(report["int8"])
        )
    return (
        f"model params {report['params_ratio']:.1%} of dense (method {report['method']}: attention "
        f"{report['attn_params_ratio']:.1%}"
        + ("" if mlp is None else f", MLPs {mlp:.1%}")
        + ")\n"
        + "\n".join(lines)
        + where
        + timing
    )


def plan_lines(phases: list[dict]) -> list[str]:
    """One line per phase of a run's plan (job.plan): what runs and how, or why it does not."""
    return [f"{p['phase']:>12}: " + (p["how"] if p["runs"] else f"skipped ({p['how']})") for p in phases]


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
    if report.get("plan"):
        lines += ["Phases:", "", "```", *plan_lines(report["plan"]), "```", ""]
    if report.get("calibration") and report["calibration"] != "none":
        lines += [
            f"Factors fitted to the layers' inputs on the training {report.get('data', {}).get('unit', 'images')} "
            f"({report['calibration']} calibration).",
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
            f"Validation split (held out from training, {n} {report.get('data', {}).get('unit', 'images')}): "
            + "; ".join(parts)
            + ".",
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
