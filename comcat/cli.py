"""python -m comcat {analyze,compress,evaluate,demo} -- headless jobs; errors are one line, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys

MODEL_HELP = ("model SPEC: 'embedded' (default, the bundled shapes ViT), a timm name with pretrained weights "
              "(e.g. deit_small_patch16_224; needs network or a hub cache), a local checkpoint "
              "(.safetensors/.pth/.bin, with --arch), or a compressed-model directory")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--arch", default=None, metavar="NAME",
                   help="timm architecture of a local checkpoint, e.g. vit_tiny_patch16_224")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m comcat", description=(
        "COMCAT: head-level low-rank compression of vision transformers. Without a command, runs the "
        "demo: analyze and compress the embedded model and print a result table."))
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser("analyze", help="singular-value spectra, matrix vs head level",
                       description="Spectra of W^Q, W^K, W^V, W^O and of every head's W^QK_h, W^VO_h.")
    _model_args(a)
    a.add_argument("--json", metavar="F", help="write spectra, energy curves and param curves to this JSON file")
    a.add_argument("--plots", metavar="DIR", help="write energy_heatmaps.png and param_curves.png here")
    a.add_argument("--energy", type=float, default=0.9, help="energy threshold of the printed summary (default 0.9)")

    c = sub.add_parser("compress", help="convert to low rank, report params/FLOPs/top-1/latency, save",
                       description="Compress every attention layer (and optionally the MLPs) by truncated SVD.")
    _model_args(c)
    c.add_argument("--method", choices=("head", "matrix"), default="head",
                   help="head: COMCAT per-head W^QK_h/W^VO_h (default); matrix: factorize W^Q, W^K, W^V, W^O separately")
    rule = c.add_mutually_exclusive_group(required=True)
    rule.add_argument("--ranks", metavar="F", help="per-layer rank config JSON (as written in comcat.json 'ranks')")
    rule.add_argument("--energy", type=float, metavar="E", help="keep this fraction of squared singular values, e.g. 0.95")
    rule.add_argument("--params-ratio", type=float, metavar="R", help="keep this fraction of the compressed sites' params, e.g. 0.5")
    c.add_argument("--allocate", choices=("uniform", "energy", "greedy"), default="uniform",
                   help="with --params-ratio: same rank in every layer (uniform, default); one energy threshold "
                        "for all layers, the largest that meets the budget (energy); or rank steps taken by "
                        "energy gained per parameter until the budget is met (greedy)")
    c.add_argument("--mlp", action="store_true", help="also factorize MLP fc1/fc2 by the same rule")
    c.add_argument("--classifier-rank", type=int, default=None, metavar="R", help="also factorize the classifier at rank R")
    c.add_argument("--data", metavar="DIR", help="ImageFolder to evaluate top-1 on (default: embedded held-out shapes "
                                                 "for the embedded model)")
    c.add_argument("--no-eval", action="store_true", help="skip top-1 evaluation")
    c.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    c.add_argument("--out", metavar="DIR", required=True, help="write model.safetensors + comcat.json + report.md here")

    e = sub.add_parser("evaluate", help="top-1/top-5 of a model or compressed directory",
                       description="Evaluate on the embedded held-out shapes or an ImageFolder directory.")
    _model_args(e)
    e.add_argument("--data", metavar="DIR", help="ImageFolder (DIR/<class>/<image>); default: embedded held-out shapes")
    e.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    e.add_argument("--json", metavar="F", help="write the metrics to this JSON file")

    sub.add_parser("demo", help="analyze + compress the embedded model and print a table (the default)")
    return ap


def _write_json(path: str, obj) -> None:
    from .io import atomic_write_text
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def cmd_analyze(args) -> None:
    from .analysis import analyze
    from .models import load_model
    from .plots import save_analysis_plots

    loaded = load_model(args.model, args.arch)
    spectra = analyze(loaded.model)
    print(f"{loaded.source}: {spectra.depth} blocks, {spectra.num_heads} heads of dim {spectra.head_dim}, width {spectra.dim}")
    print(spectra.summary(args.energy))
    if args.json:
        _write_json(args.json, {"model": loaded.source, **spectra.to_dict()})
        print(f"wrote {args.json}")
    if args.plots:
        for p in save_analysis_plots(spectra, args.plots):
            print(f"wrote {p}")


def report_markdown(report: dict, source: str) -> str:
    from .pipeline import format_report
    return f"# comcat compression report\n\nModel: `{source}`\n\n```\n{format_report(report)}\n```\n"


def cmd_compress(args) -> None:
    from .io import atomic_write_text, save_compressed
    from .models import load_model
    from .pipeline import choose_ranks, format_report, run_compress

    loaded = load_model(args.model, args.arch)
    cfg = choose_ranks(loaded, args.method, args.ranks, args.energy, args.params_ratio, args.allocate,
                       args.mlp, args.classifier_rank)
    evaluate_top1 = not args.no_eval and (args.data is not None or loaded.source == "embedded")
    small, report = run_compress(loaded, cfg, args.data, evaluate_top1, not args.no_latency)
    metrics = {k: {m: report[k][m] for m in ("top1", "top5", "images", "latency_ms") if m in report[k]}
               for k in ("dense", "compressed")}
    out = save_compressed(small, args.out, {"metrics": metrics, "report": report})
    atomic_write_text(out / "report.md", report_markdown(report, loaded.source))
    print(format_report(report))
    print(f"saved {out}")


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate
    from .models import load_model

    loaded = load_model(args.model, args.arch)
    metrics = {"model": loaded.source, **evaluate(loaded.model, args.data, batch_size=args.batch_size)}
    print(f"{loaded.source}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['images']} images)")
    if args.json:
        _write_json(args.json, metrics)


def cmd_demo(args) -> None:
    from .analysis import analyze
    from .evaluate import evaluate
    from .models import load_model
    from .pipeline import choose_ranks, run_compress

    loaded = load_model("embedded")
    spectra = analyze(loaded.model)
    print(f"embedded shapes ViT: {spectra.depth} blocks, {spectra.num_heads} heads of dim {spectra.head_dim}")
    print(spectra.summary(0.9))
    dense = evaluate(loaded.model, progress=False)
    print(f"\ncompressed attention, uniform ranks, no fine-tuning (dense top-1 {dense['top1']:.2f}%)")
    print(f"{'method':8} {'attn params':>11} {'model params':>12} {'FLOPs':>8} {'top-1 %':>8}")
    for ratio in (0.75, 0.5):
        for method in ("head", "matrix"):
            cfg = choose_ranks(loaded, method, params_ratio=ratio)
            _, r = run_compress(loaded, cfg, latency=False, progress=False, dense_top1=dense)
            c = r["compressed"]
            print(f"{method:8} {r['attn_params_ratio']:>11.1%} {c['params']:>12,} "
                  f"{c['flops'] / 1e6:>7.1f}M {c['top1']:>8.2f}")


def main(argv=None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    from .errors import ComcatError

    handler = {"analyze": cmd_analyze, "compress": cmd_compress, "evaluate": cmd_evaluate}.get(args.command, cmd_demo)
    try:
        handler(args)
    except ComcatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
