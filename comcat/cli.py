"""python -m comcat {analyze,compress,evaluate,customize,generate,demo} -- headless jobs. Exit codes:
0 done, 2 an error (one line), 3 stopped by Ctrl-C / SIGTERM with the run saved (--resume continues),
130 aborted by a second Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .core.errors import ComcatError

EXIT_ERROR, EXIT_STOPPED, EXIT_ABORTED = 2, 3, 130
EXIT_HELP = (
    "exit codes: 0 finished, 2 an error (one line on stderr), 3 stopped by Ctrl-C or SIGTERM with the run "
    "saved (--resume continues it), 130 aborted by a second Ctrl-C"
)

MODEL_HELP = (
    "model SPEC: 'embedded' (default, the bundled shapes ViT), a timm name with pretrained weights "
    "(e.g. deit_small_patch16_224; needs network or a hub cache), a local checkpoint "
    "(.safetensors/.pth/.bin, with --arch), a compressed-model directory, a transformers folder "
    "(save_pretrained: ViT, DeiT, DINOv2, CLIP / SigLIP vision, BERT) or hub id (org/name), or a timm model on "
    "the hub (hf-hub:org/name)"
)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", metavar="SPEC", help=MODEL_HELP)
    p.add_argument(
        "--arch",
        default=None,
        metavar="NAME",
        help="timm architecture of a local checkpoint, e.g. vit_tiny_patch16_224",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m comcat",
        description=(
            "COMCAT: head-level low-rank compression of vision transformers. Without a command, runs the "
            "demo: analyze and compress the embedded model and print a result table."
        ),
        epilog=EXIT_HELP,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser(
        "analyze",
        help="singular-value spectra, matrix vs head level",
        description="Spectra of W^Q, W^K, W^V, W^O and of every head's W^QK_h, W^VO_h.",
    )
    _model_args(a)
    a.add_argument("--json", metavar="F", help="write spectra, energy curves and param curves to this JSON file")
    a.add_argument("--plots", metavar="DIR", help="write energy_heatmaps.png and param_curves.png here")
    a.add_argument("--energy", type=float, default=0.9, help="energy threshold of the printed summary (default 0.9)")
    a.add_argument(
        "--table",
        metavar="F.csv",
        help="write the per-layer diagnosis (stable and effective rank, ranks "
        "for 90/95/99%% energy, tail exponent, against shuffled weights) to this CSV file",
    )
    a.add_argument(
        "--recommend",
        type=float,
        metavar="R",
        help="print the head-level ranks comcat would choose at "
        "this fraction of the attention parameters, with the predicted savings",
    )
    a.add_argument(
        "--data",
        metavar="DIR",
        help="with --recommend: calibrate the ranks on these images (labels "
        "unused), as a compress run on them starts from",
    )
    a.add_argument(
        "--dense",
        metavar="SPEC",
        help="when --model is a compressed-model directory: its dense source "
        "(default: the source named in its comcat.json); prints the heads that lost most",
    )
    a.add_argument(
        "--dense-arch",
        metavar="NAME",
        help="timm architecture of a --dense checkpoint (default: the compressed model's)",
    )

    c = sub.add_parser(
        "compress",
        help="find ranks, convert to low rank, fine-tune, report, save",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compress every attention layer (and optionally the MLPs) under a budget. "
        "With --data: calibrate on your images (labels unused), allocate ranks, "
        "distill block by block from the dense model, report on held-out images. "
        "Runs under torchrun --nproc_per_node N too. Ctrl-C stops cleanly; "
        "--resume continues.",
        epilog="examples:\n"
        "  # your checkpoint at half its parameters, your images (one click)\n"
        "  python -m comcat compress --model vit_tiny.safetensors --arch vit_tiny_patch16_224 \\\n"
        "      --params-ratio 0.5 --data my_images/ --out small/\n"
        "  python -m comcat compress --resume small/           # after Ctrl-C or a crash\n"
        "  # the embedded model, rank search with MLPs, no data needed\n"
        "  python -m comcat compress --search --mlp --params-ratio 0.5 --out tiny/\n"
        "  # plain SVD at ranks keeping 90% of the spectral energy\n"
        "  python -m comcat compress --energy 0.9 --out energy/\n\n"
        "--out must be a new or empty folder, or an earlier compress run's (then --resume or --overwrite):\n"
        "a folder holding anything else is refused and nothing in it is touched. A finished run keeps\n"
        "model.safetensors, comcat.json, report.md and ranks.png; a stopped one also keeps job.json and\n"
        "state/ for --resume.\n" + EXIT_HELP,
    )
    _model_args(c)
    c.add_argument(
        "--method",
        choices=("head", "matrix"),
        default="head",
        help="head: COMCAT per-head W^QK_h/W^VO_h (default); matrix: factorize W^Q, W^K, W^V, W^O separately",
    )
    c.add_argument("--ranks", metavar="F", help="per-layer rank config JSON (as written in comcat.json 'ranks')")
    c.add_argument("--energy", type=float, metavar="E", help="keep this fraction of squared singular values, e.g. 0.95")
    c.add_argument(
        "--params-ratio",
        type=float,
        metavar="R",
        help="budget: keep this fraction of the whole model's params (FLOPs with --budget flops); with "
        "--scope attention, of the compressed sites' (attention, and the MLPs with --mlp)",
    )
    c.add_argument(
        "--scope",
        choices=("model", "attention"),
        default="attention",
        help="model: --params-ratio is a fraction of the whole model, and the MLPs are compressed "
        "too (--mlp none: attention only); attention (default): a fraction of the attention (plus the MLPs with --mlp)",
    )
    c.add_argument(
        "--search",
        action="store_true",
        help="choose per-layer ranks by differentiable Gumbel-softmax search under the budget",
    )
    c.add_argument(
        "--budget",
        choices=("params", "flops"),
        default="params",
        help="what --params-ratio limits in the search (default params)",
    )
    c.add_argument("--search-epochs", type=int, default=4, metavar="N", help="search epochs (default 4)")
    c.add_argument(
        "--decode",
        choices=("expected", "argmax"),
        default="expected",
        help="final searched ranks: each site's expected rank under the learned logits scaled to "
        "the budget (default), or the argmax candidate fitted by logit price",
    )
    c.add_argument(
        "--allocate",
        choices=("auto", "calibrated", "uniform", "energy", "greedy"),
        default="auto",
        help="without --search, how --params-ratio is shared out: calibrated (the default with images): "
        "where the predicted KL to the dense model falls most per parameter; uniform: the same rank "
        "everywhere; energy: one spectral-energy threshold for all layers; greedy: rank steps by "
        "spectral energy per parameter (with --search: where the search starts)",
    )
    c.add_argument(
        "--calibration",
        choices=("auto", "data", "sequential", "none"),
        default="auto",
        help="data (the default with images): fit every factor to the inputs its layer sees in the "
        "dense model on the training images (labels unused); sequential: in the compressed model, "
        "block after block; none: plain SVD of the weights (the default without images)",
    )
    c.add_argument(
        "--calibration-images",
        type=int,
        default=512,
        metavar="N",
        help="training images for calibration and block distillation (default 512)",
    )
    c.add_argument(
        "--distill-steps",
        type=int,
        default=100,
        metavar="K",
        help="block-wise distillation: K steps per block, each compressed block learning to reproduce "
        "the dense block's output (default 100; 0: none)",
    )
    c.add_argument("--distill-lr", type=float, default=1e-3, help="block distillation learning rate (default 1e-3)")
    c.add_argument(
        "--distill-views",
        type=int,
        default=2,
        metavar="V",
        help="block distillation also on V augmented passes (crop, flip, mixup/cutmix) over its "
        "images (default 2; 0: the images as they are)",
    )
    c.add_argument(
        "--distill-cls",
        type=float,
        default=1.0,
        metavar="W",
        help="block distillation: extra weight W of the error of what the head reads, the class token or, "
        "for a model that averages its tokens, their mean (default 1; 0: all tokens alike)",
    )
    c.add_argument(
        "--finetune-epochs",
        type=int,
        default=0,
        metavar="M",
        help="end-to-end distillation epochs after that: KL to the dense model on mixup/cutmix views (default 0)",
    )
    c.add_argument(
        "--labels",
        action="store_true",
        help="also train on the images' labels (class folders of the model's classes only)",
    )
    c.add_argument("--no-mix", action="store_true", help="end-to-end distillation without mixup / cutmix")
    c.add_argument(
        "--similarity",
        type=float,
        default=0.0,
        metavar="W",
        help="a model without a classifier: end-to-end distillation also matches the batch's cosine-similarity "
        "matrix of the embeddings, weighted W (default 0)",
    )
    c.add_argument(
        "--mlp",
        nargs="?",
        const="auto",
        choices=("auto", "neurons", "lowrank", "none"),
        default=None,
        help="how the MLPs are compressed: neurons (kept by their calibrated refit error, fc2 refit in closed "
        "form; the default with images), lowrank (fc1 / fc2 factorized; the default without images, and "
        "with --search), none (kept dense). Default: compressed with --scope model, dense with --scope attention",
    )
    c.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="int8: save the model with int8 linears (torchao's dynamic int8; its float32 form in OUT/float/), "
        "and report its size, scores and CPU latency beside the dense model in float32 and int8",
    )
    c.add_argument(
        "--classifier-rank",
        type=int,
        default=None,
        metavar="R",
        help="also factorize the classifier at rank R (with --search: search its rank too, any R)",
    )
    c.add_argument(
        "--data",
        metavar="DIR",
        help="images: DIR/<class>/<image> or a flat DIR/<image> (unlabeled; a "
        "seeded half is evaluated, the rest split into training and validation) or DIR/train + DIR/val "
        "(default: embedded shapes for the embedded model); for a text encoder a text file with one "
        "sentence per line, split the same way (search and fine-tuning; no calibration yet)",
    )
    c.add_argument(
        "--train-images",
        type=int,
        default=4096,
        metavar="N",
        help="embedded data: shapes generated for fine-tuning and weight epochs (default 4096)",
    )
    c.add_argument(
        "--fit-images",
        type=int,
        default=1024,
        metavar="N",
        help="embedded: shapes generated for calibration and the search; DIR/train+val: training "
        "images they use (1024)",
    )
    c.add_argument("--seed", type=int, default=0, help="seed of data order, splits and sampling (default 0)")
    c.add_argument("--batch-size", type=int, default=64, help="batch size per process (default 64)")
    c.add_argument("--lr", type=float, default=5e-5, help="end-to-end learning rate (AdamW, cosine; default 5e-5)")
    c.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    c.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    c.add_argument("--no-eval", action="store_true", help="skip top-1 evaluation")
    c.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    c.add_argument("--out", metavar="DIR", help="write model.safetensors + comcat.json + report.md + ranks.png here")
    c.add_argument("--resume", metavar="DIR", help="continue a stopped run from its --out folder (other flags ignored)")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier run or model in --out (its files only)")

    e = sub.add_parser(
        "evaluate",
        help="top-1/top-5 of a model or compressed directory",
        description="Evaluate on the embedded held-out shapes or an ImageFolder directory.",
    )
    _model_args(e)
    e.add_argument("--data", metavar="DIR", help="ImageFolder (DIR/<class>/<image>); default: embedded held-out shapes")
    e.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    e.add_argument("--json", metavar="F", help="write the metrics to this JSON file")

    x = sub.add_parser(
        "export",
        help="write a model as ONNX, or an adapter as a LoRA file other tools load",
        description="A model (dense or compressed) with --onnx: an ONNX graph with a dynamic batch dimension "
        "(torch's exporter), run in ONNX Runtime on real inputs, with its largest error relative to PyTorch's "
        "outputs and both latencies measured side by side. An adapter with --format: LoRA factors on "
        "to_q/to_k/to_v/to_out fitted in closed form to reproduce its per-head W^QK and W^VO, written for "
        "diffusers (load_lora_weights), kohya-based tools or ComfyUI/A1111, with the learned token beside it as a "
        "textual-inversion file; or baked into a full pipeline folder (--format bake).",
        epilog="examples:\n  python -m comcat export small/ --onnx small.onnx --int8 --data my_images/\n"
        "  python -m comcat export heart/ --format diffusers --out heart_lora.safetensors\n"
        "  python -m comcat export heart/ --format bake --out heart_pipeline/\n\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    x.add_argument(
        "source", nargs="?", default=None, metavar="MODEL|ADAPTER", help="the model (as --model takes it) or adapter"
    )
    _model_args(x)
    x.add_argument("--onnx", metavar="FILE", help="the ONNX file to write (.onnx)")
    x.add_argument("--format", choices=["diffusers", "kohya", "comfy", "bake"], help="write the ADAPTER in this form")
    x.add_argument("--out", metavar="PATH", help="with --format: the .safetensors file (a folder for bake)")
    x.add_argument(
        "--rank", type=int, default=None, help="with --format: the LoRA rank (default: heads x the adapter's rank)"
    )
    x.add_argument(
        "--pipeline", default=None, metavar="P", help="with --format: the adapter's base pipeline (default: its own)"
    )
    x.add_argument("--int8", action="store_true", help="int8 weights by ONNX Runtime's dynamic quantization")
    x.add_argument(
        "--data",
        metavar="DIR",
        help="images to check the graph on (default: the embedded shapes for the embedded models, else random inputs)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    x.add_argument("--json", metavar="F", help="write the figures to this JSON file")

    PIPE_HELP = (
        "text-to-image pipeline: 'embedded' (default, the bundled shapes model), a hub ID "
        "(e.g. runwayml/stable-diffusion-v1-5; needs network or a hub cache) or a local diffusers folder"
    )
    cu = sub.add_parser(
        "customize",
        help="teach a text-to-image pipeline a concept with a COMCAT adapter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--out must be a new or empty folder, or an earlier customize run's (then --resume or\n"
        "--overwrite): a folder holding anything else is refused and nothing in it is touched. A finished\n"
        "run keeps adapter.safetensors, customize.json (its record) and previews/; a stopped or killed\n"
        "one also keeps state.json + state.*.safetensors, which --resume continues from.\n" + EXIT_HELP,
        description="Train per-head rank-r updates of W^QK and W^VO in every attention of the "
        "UNet on a few images of a concept; the model stays frozen. Ctrl-C stops "
        "cleanly; --resume continues.",
    )
    cu.add_argument("--pipeline", default="embedded", metavar="SPEC", help=PIPE_HELP)
    cu.add_argument(
        "--images", metavar="DIR", help="3-10 images of the concept (NAME.txt beside an image is its caption)"
    )
    cu.add_argument("--prompt", default="a photo of V* dog", help="instance prompt with the concept token")
    cu.add_argument("--token", default="V*", help="the concept's token in prompts (default V*)")
    cu.add_argument("--rank", type=int, default=2, help="rank per head (default 2)")
    cu.add_argument(
        "--shared-basis",
        action="store_true",
        help="heads share one rank-wide basis per side, each head its own rank x rank cores: a file the size of "
        "a rank-r LoRA on many-headed models (SDXL, SD3, Flux)",
    )
    cu.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    cu.add_argument("--lr", type=float, default=2.5e-3, help="AdamW learning rate (default 2.5e-3)")
    cu.add_argument("--batch-size", type=int, default=4, help="images per step (default 4)")
    cu.add_argument("--targets", default="self,cross", help="attentions to adapt: self,cross (default), self or cross")
    cu.add_argument(
        "--learn-token",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also learn the token's embedding (default; --no-learn-token: adapter only)",
    )
    cu.add_argument("--class-prompt", help="prior preservation: also train on the base model's images of this prompt")
    cu.add_argument("--class-images", type=int, default=8, help="class images generated for prior preservation (8)")
    cu.add_argument(
        "--preview-every", type=int, default=50, metavar="K", help="save a preview every K steps (0: never)"
    )
    cu.add_argument("--seed", type=int, default=0, help="seed of batches, noise and previews (default 0)")
    cu.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    cu.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16 mixed precision or fp32 (auto: bf16 on CUDA, fp32 on the CPU; bf16 also pays off on CPUs with AMX)",
    )
    cu.add_argument("--out", metavar="DIR", help="write adapter.safetensors, previews/ and the run state here")
    cu.add_argument("--resume", metavar="DIR", help="continue a stopped run from its --out folder")
    cu.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out (its files only)")
    cu.add_argument(
        "--checkpoint-every",
        type=int,
        default=50,
        metavar="K",
        help="save the resumable state every K steps (default 50; a killed run resumes from there)",
    )

    g = sub.add_parser(
        "generate",
        help="text-to-image with zero or more adapters",
        description="Generate images from a prompt; --adapter DIR[:SCALE] may repeat.",
    )
    g.add_argument("--pipeline", default="embedded", metavar="SPEC", help=PIPE_HELP)
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR[:SCALE]",
        help="adapter folder or file, optionally with its strength, e.g. out/heart:0.8",
    )
    g.add_argument("--prompt", required=True, help="what to draw, e.g. 'a V* in blue'")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance (default: the pipeline's; 2.5 for embedded, 7.5 for SD)",
    )
    g.add_argument("--n", type=int, default=1, help="images (tiled into one picture; default 1, at most 64)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    g.add_argument("--out", required=True, metavar="FILE", help="image file to write (.png/.jpg/.webp)")

    sub.add_parser("demo", help="analyze + compress the embedded model and print a table (the default)")
    return ap


def _write_json(path: str, obj) -> None:
    from .core.files import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def cmd_analyze(args) -> None:
    from .compression import families
    from .compression.analysis import analyze
    from .compression.load import load_model
    from .compression.plots import save_analysis_plots

    if not 0 < args.energy <= 1:
        raise ComcatError(f"--energy must be in (0, 1], got {args.energy}: e.g. 0.9 keeps 90% of the spectral energy")
    if args.data and args.recommend is None:
        raise ComcatError("--data calibrates a recommendation: also pass --recommend R, e.g. --recommend 0.5")
    if args.recommend is not None and not 0 < args.recommend <= 1:
        raise ComcatError(
            f"--recommend must be in (0, 1], got {args.recommend}: e.g. 0.5 keeps half the attention parameters"
        )
    loaded = load_model(args.model, args.arch)
    if loaded.compressed:
        return _compare_to_dense(loaded, args)
    if args.dense:
        raise ComcatError(
            "--dense compares a compressed model with its source: pass the compressed-model directory as --model"
        )
    spectra = analyze(loaded.model)
    print(f"{loaded.source}: {spectra.shape_line()}; {families.describe(loaded.model)}")
    print(spectra.summary(args.energy))
    if args.json:
        _write_json(args.json, {"model": loaded.source, **spectra.to_dict()})
        print(f"wrote {args.json}")
    if args.plots:
        for p in save_analysis_plots(spectra, args.plots):
            print(f"wrote {p}")
    if args.table:
        from .compression.diagnose import layer_table, table_summary, to_csv
        from .core.files import atomic_write_text

        if Path(args.table).is_dir():
            raise ComcatError(f"--table {args.table} is a folder: give a .csv file name")
        rows = layer_table(loaded.model)
        print(table_summary(rows))
        atomic_write_text(args.table, to_csv(rows))
        print(f"wrote {args.table}")
    if args.recommend is not None:
        from .compression.diagnose import calibrate_on, recommend, recommendation_text

        cal = None
        if args.data:
            from tqdm import tqdm

            with tqdm(desc="calibrate (blocks)", unit="block") as bar:
                cal = calibrate_on(loaded.model, args.data, progress=lambda i, n: _tick(bar, i, n))
            with tqdm(desc="allocate (probes)", unit="site") as bar:
                rec = recommend(loaded.model, args.recommend, spectra, cal, progress=lambda i, n: _tick(bar, i, n))
        else:
            rec = recommend(loaded.model, args.recommend, spectra)
        print(recommendation_text(rec).replace("**", ""))


def _tick(bar, i: int, n: int) -> None:
    bar.total = n
    bar.update(i + 1 - bar.n)


def _compare_to_dense(small, args) -> None:
    """`analyze` of a compressed model: the per-head errors against its dense source."""
    from .compression.diagnose import comparison_text, head_errors
    from .compression.load import load_model

    if args.recommend is not None or args.table or args.plots or args.json:
        raise ComcatError(
            f"{small.source} is a compressed model: analyze its dense source for spectra, tables and "
            "recommendations (or pass only --dense to compare the two)"
        )
    spec = args.dense or small.meta.get("source", "")
    try:
        dense = load_model(spec, args.dense_arch or small.arch)
    except ComcatError as e:
        raise ComcatError(
            f"the dense source of {small.source} ({spec}) cannot be loaded ({e}): pass it with --dense SPEC"
        ) from None
    if dense.compressed or (dense.arch, dense.arch_kwargs) != (small.arch, small.arch_kwargs):
        raise ComcatError(
            f"{small.source} was compressed from a dense {small.arch} model, and {spec} is not one: "
            "pass its dense source with --dense SPEC"
        )
    print(f"{small.source} against {dense.source}:")
    print(comparison_text(head_errors(dense.model, small.model), small.meta.get("ranks")))


BARS = {
    "calibrate": "calibrate (blocks)",
    "allocate": "allocate (probes)",
    "search": "rank search",
    "distill": "block distillation",
    "finetune": "fine-tune",
}


def validation_line(e: dict, unit: str = "images") -> str:
    """One line of validation scores: fidelity to the dense model, top-1 when labeled."""
    from .compression.evaluate import fidelity

    top1 = f", top-1 {e['top1']:.2f}%" if "top1" in e else ""
    return f"validation ({e['images']} held-out {unit}) {fidelity(e)} against the dense model{top1}"


class TqdmProgress:
    """Turns run_job events into one tqdm bar per phase (main process only)."""

    def __init__(self):
        self.bar = None
        self.unit = "images"  # what the data's items are (the data event says)

    def __call__(self, e: dict) -> None:
        from tqdm.auto import tqdm

        from .core import dist

        if not dist.is_main():
            return
        kind = e["kind"]
        if kind == "plan":
            from .compression.report import plan_lines

            print("phases:\n" + "\n".join(plan_lines(e["phases"])))
            return
        if kind == "phase":
            self.close()
            if e["phase"] == "data":
                self.unit = e.get("unit", "images")
                print(f"data: {e['source']}: " + ", ".join(f"{k} {v}" for k, v in e["sizes"].items()))
                if e.get("note"):
                    print(f"  {e['note']}: figures are fidelity to the dense model, not top-1")
            return
        if kind in BARS and self.bar is None:
            self.bar = tqdm(total=e["total"], desc=BARS[kind], dynamic_ncols=True)
        if kind == "search":
            self.bar.set_postfix_str(
                f"{e['phase']} loss {e['loss']:.3f} cost/target {e['cost'] / e['target']:.3f} tau {e['tau']:.2f}",
                refresh=False,
            )
        elif kind == "finetune":
            self.bar.set_postfix_str(f"loss {e['loss']:.3f} lr {e['lr']:.2e}", refresh=False)
        elif kind == "distill":
            self.bar.set_postfix_str(f"block {e['block'] + 1}/{e['blocks']} loss {e['loss']:.4f}", refresh=False)
        elif kind == "validate":
            (self.bar.write if self.bar else print)(
                validation_line(e, self.unit) + (f" after {e['after']}" if "after" in e else "")
            )
            return
        if self.bar is not None and kind in BARS:
            self.bar.n = e["step"]
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def job_spec(args):
    """The JobSpec of `compress`'s flags (which checks them); flags that need each other are checked here."""
    from .compression.distill import FinetuneConfig
    from .compression.job import JobSpec
    from .compression.reconstruct import DistillConfig
    from .compression.search import SearchConfig

    rules = sum(x is not None for x in (args.ranks, args.energy, args.params_ratio))
    if args.search and (args.ranks or args.energy is not None):
        raise ComcatError("--search chooses the ranks itself: drop --ranks / --energy and give --params-ratio R")
    if rules != 1:
        raise ComcatError("give exactly one of --ranks FILE, --energy E or --params-ratio R (or --resume DIR)")
    if args.finetune_epochs < 0:
        raise ComcatError(f"--finetune-epochs must be >= 0, got {args.finetune_epochs}")
    distill = DistillConfig(
        steps=args.distill_steps,
        lr=args.distill_lr,
        views=args.distill_views,
        cls_weight=args.distill_cls,
        mix=not args.no_mix,
    )
    search = (
        SearchConfig(
            epochs=args.search_epochs,
            batch_size=args.batch_size,
            decode=args.decode,
            classifier=args.classifier_rank is not None,
        )
        if args.search
        else None
    )
    finetune = (
        FinetuneConfig(
            epochs=args.finetune_epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            mix=not args.no_mix,
            similarity=args.similarity,
        )
        if args.finetune_epochs
        else None
    )
    return JobSpec(
        model=args.model,
        arch=args.arch,
        data=args.data,
        method=args.method,
        ratio=args.params_ratio,
        budget=args.budget,
        scope=args.scope,
        mlp={None: None, "auto": True, "none": False}.get(args.mlp, args.mlp),
        ranks_file=args.ranks,
        energy=args.energy,
        classifier_rank=None if args.search else args.classifier_rank,
        allocate=args.allocate,
        calibration=args.calibration,
        calibration_images=args.calibration_images,
        distill=distill,
        search=search,
        finetune=finetune,
        train_images=args.train_images,
        fit_images=args.fit_images,
        seed=args.seed,
        labels=args.labels,
        device=args.device,
        workers=args.workers,
        evaluate=not args.no_eval,
        latency=not args.no_latency,
        quantize=args.quantize,
    )


def cmd_compress(args) -> None:
    from .compression.job import run_job
    from .compression.report import format_report
    from .core import dist
    from .core.loop import StopFlag

    if args.resume is None and args.out is None:
        raise ComcatError("give --out DIR for the compressed model (or --resume DIR to continue a run)")
    spec = None if args.resume else job_spec(args)
    stop = StopFlag()
    stop.install_signal()
    progress = TqdmProgress()
    try:
        result = run_job(
            spec,
            args.resume or args.out,
            resume=args.resume is not None,
            callback=progress,
            should_stop=stop,
            progress=True,
            overwrite=args.overwrite,
        )
        main_process = dist.is_main()
    finally:
        progress.close()
        dist.cleanup()
    if main_process:
        print(format_report(result["report"]))
        if result["stopped"]:
            print(
                f"stopped during {result['stopped']}: saved the best valid model so far to {result['out']}; "
                f"continue with: python -m comcat compress --resume {result['out']}"
            )
            return EXIT_STOPPED
        print(f"saved {result['out']}")
    return EXIT_STOPPED if result["stopped"] else 0


def cmd_evaluate(args) -> None:
    from .compression import families
    from .compression.evaluate import evaluate
    from .compression.load import load_model
    from .compression.models import has_classifier
    from .core.records import MAX_BATCH, check_count

    check_count(args.batch_size, "--batch-size", 1, MAX_BATCH)
    loaded = load_model(args.model, args.arch)
    size = families.input_size(loaded.model)
    if args.data is None and tuple(size) != (3, 32, 32):
        shown = f"{size[-1]}-px images" if len(size) == 3 else "sentences"
        raise ComcatError(
            f"{loaded.source} takes {shown}, and without --data evaluate scores the 32-px embedded shapes: "
            "pass --data DIR with images of your own (class folders for top-1)"
        )
    metrics = {"model": loaded.source, **evaluate(loaded.model, args.data, batch_size=args.batch_size)}
    trained_on = (loaded.meta or {}).get("report", {}).get("data", {}) if loaded.compressed else {}
    given = (str(Path(args.data)), str(Path(args.data).resolve())) if args.data else ()
    if given and str(trained_on.get("source", "")).startswith(given):
        print(
            f"note: these figures count all {metrics['images']} images of {args.data}, including the ones its compress "
            "run fitted and validated on; its report.md has the figures on the held-out images alone"
        )
    if not has_classifier(loaded.model):
        print(
            f"{loaded.source} has no classifier, so no top-1 on {metrics['images']} images: the fidelity of a "
            "compressed model's embeddings to its dense model's is in its report.md"
        )
    elif "top1" in metrics:
        print(
            f"{loaded.source}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  ({metrics['images']} images)"
        )
    else:
        print(
            f"{loaded.source}: {metrics['images']} images without labels of the model's classes, so no top-1 "
            "(compare a compressed model with its dense one in its report.md)"
        )
    if args.json:
        _write_json(args.json, metrics)


class LoraFitBars:
    """A tqdm bar per stage of a LoRA fit, from export's {"kind": "lora", "stage", "step", "total"} events."""

    def __init__(self):
        self.bars = {}

    def __call__(self, e: dict) -> None:
        from tqdm.auto import tqdm

        if e["stage"] not in self.bars:
            self.bars[e["stage"]] = tqdm(total=e["total"], desc=f"LoRA fit, {e['stage']}", unit="attention")
        bar = self.bars[e["stage"]]
        bar.n = e["step"]
        bar.refresh()
        if e["step"] == e["total"]:
            bar.close()


def cmd_export_adapter(args) -> None:
    from .core.files import check_file_out
    from .core.loop import RunControl, StopFlag
    from .customization.adapter.config import MAX_RANK
    from .customization.adapter.model import read_adapter
    from .customization.diffusion.pipeline import load_pipeline
    from .customization.lora_export import bake_adapter, error_line, export_adapter

    if not args.source or not args.out:
        raise ComcatError(
            "export --format needs the adapter and --out: export heart/ --format diffusers --out heart.safetensors"
        )
    if args.rank is not None and not 1 <= args.rank <= 16 * MAX_RANK:
        raise ComcatError(f"--rank must be an integer in 1..{16 * MAX_RANK}, got {args.rank}")
    out = Path(args.out)
    config, _ = read_adapter(args.source)
    if args.format != "bake":
        check_file_out(out, ".safetensors", "--out", args.source, args.overwrite)
    pipe = load_pipeline(args.pipeline or config.base_model or "embedded")
    stop = StopFlag()
    stop.install_signal()  # Ctrl-C: stop the fit; nothing is written
    control = RunControl(LoraFitBars(), stop)
    if args.format == "bake":
        r = bake_adapter(pipe, args.source, out, args.rank, args.overwrite, control=control)
        print(f"wrote {out}: the pipeline with the adapter's LoRA fit (rank {r['rank']}) merged and {r['token']} added")
    else:
        r = export_adapter(pipe, args.source, args.format, out, args.rank, control=control)
        tok = f", token {r['token']} in {r['token_file']}" if r["token_file"] else ""
        print(f"wrote {out} ({args.format}, LoRA rank {r['rank']} on {r['sites']} attentions{tok})")
    print("  " + error_line(r))
    if args.json:
        _write_json(args.json, {k: v for k, v in r.items() if k != "fits"})


def cmd_export(args) -> None:
    import torch

    if args.format:
        return cmd_export_adapter(args)
    if not args.onnx:
        raise ComcatError("export needs --onnx FILE for a model, or --format F --out FILE for an adapter")

    from .compression import families
    from .compression.evaluate import resolve_data
    from .compression.export import check_onnx_out, export_onnx
    from .compression.load import load_model

    model = args.source or args.model
    path = Path(args.onnx)
    check_onnx_out(path, model, args.overwrite)
    loaded = load_model(model, args.arch)
    size = tuple(families.input_size(loaded.model))
    if args.data or size == (3, 32, 32):
        data = resolve_data(args.data, loaded.model)
        inputs, what = torch.stack([data[i][0] for i in range(min(32, len(data)))]), "images"
    else:
        inputs, what = families.example_input(loaded.model, 8), "random inputs (pass --data for your images)"
    r = export_onnx(loaded.model, path, inputs, int8=args.int8)
    print(
        f"wrote {path} ({r['bytes'] / 2**20:.1f} MB{', int8' if args.int8 else ''}): largest error "
        f"{r['max_rel_error']:.1e} of the output's scale on {r['inputs']} {what}"
    )
    for b, t in r["latency"].items():
        lo, hi = t["ratio_range"]
        print(
            f"  batch {b[1:]:>3}: ONNX Runtime {t['onnx_ms']:.1f} ms, PyTorch {t['torch_ms']:.1f} ms "
            f"(ratio {t['ratio']:.2f}, {lo:.2f}-{hi:.2f} over 5 alternating rounds; the machine's load moves it)"
        )
    if args.json:
        _write_json(args.json, r)


def cmd_demo(args) -> None:
    from .compression.analysis import analyze
    from .compression.evaluate import predict, scores
    from .compression.load import load_model
    from .compression.rank_rules import choose_ranks
    from .compression.report import run_compress

    loaded = load_model("embedded")
    spectra = analyze(loaded.model)
    print(f"embedded shapes ViT: {spectra.depth} blocks, {spectra.num_heads} heads of dim {spectra.head_dim}")
    print(spectra.summary(0.9))
    logits, labels = predict(loaded.model, progress=False)
    dense = {**scores(logits, labels), "logits": logits}
    print(f"\ncompressed attention, uniform ranks, no fine-tuning (dense top-1 {dense['top1']:.2f}%)")
    print(f"{'method':8} {'attn params':>11} {'model params':>12} {'FLOPs':>8} {'top-1 %':>8}")
    for ratio in (0.75, 0.5):
        for method in ("head", "matrix"):
            cfg = choose_ranks(loaded, method, params_ratio=ratio)
            _, r = run_compress(loaded, cfg, latency=False, progress=False, dense_scores=dense)
            c = r["compressed"]
            print(
                f"{method:8} {r['attn_params_ratio']:>11.1%} {c['params']:>12,} "
                f"{c['flops'] / 1e6:>7.1f}M {c['top1']:>8.2f}"
            )


def cmd_customize(args) -> None:
    from tqdm.auto import tqdm

    from .core.loop import StopFlag
    from .customization.customize import CustomizeSpec, customize

    if args.resume is None and (args.out is None or args.images is None):
        raise ComcatError("give --images DIR and --out DIR (or --resume DIR to continue a run)")
    spec = (
        None
        if args.resume
        else CustomizeSpec(
            pipeline=args.pipeline,
            images=args.images,
            prompt=args.prompt,
            token=args.token,
            rank=args.rank,
            shared_basis=args.shared_basis,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            learn_token=args.learn_token,
            class_prompt=args.class_prompt,
            class_images=args.class_images,
            preview_every=args.preview_every,
            seed=args.seed,
            device=args.device,
            precision=args.precision,
            checkpoint_every=args.checkpoint_every,
        )
    )
    stop = StopFlag()
    stop.install_signal()
    bar = tqdm(total=spec.steps if spec else None, desc="customize", dynamic_ncols=True)

    def progress(e):
        if e["kind"] in ("start", "step"):
            bar.total, bar.n = e["steps"], e["step"]
            bar.refresh()
        if e["kind"] == "step":
            bar.set_postfix_str(f"loss {e['loss']:.4f}")
        elif e["kind"] == "preview":
            bar.write(f"preview at step {e['step']}: {e['path']}")
        elif e["kind"] == "note":
            bar.write(e["text"])

    try:
        result = customize(
            spec or CustomizeSpec(),
            args.resume or args.out,
            callback=progress,
            should_stop=stop,
            resume=args.resume is not None,
            overwrite=args.overwrite,
        )
    finally:
        bar.close()
    if result["stopped"]:
        print(
            f"stopped at step {result['steps_done']}: saved {result['adapter']}; continue with: "
            f"python -m comcat customize --resume {args.resume or args.out}"
        )
        return EXIT_STOPPED
    else:
        print(
            f"saved {result['adapter']} ({os.path.getsize(result['adapter']) / 1024:.1f} KB) "
            f"after {result['steps_done']} steps in {result['seconds']:.0f}s"
        )


MAX_GENERATE = 64  # images per generate call


def cmd_generate(args) -> None:
    from .core import dist
    from .core.records import MAX_SEED, check_count
    from .customization.diffusion.concept import grid
    from .customization.diffusion.pipeline import load_pipeline
    from .customization.generate import generate, parse_adapter_arg, save_image, with_adapters

    check_count(args.seed, "--seed", 0, MAX_SEED)
    if not 1 <= args.n <= MAX_GENERATE or not 1 <= args.steps <= 1000:
        raise ComcatError(f"--n must be in 1..{MAX_GENERATE} and --steps in 1..1000, got {args.n} and {args.steps}")
    pipe = load_pipeline(args.pipeline, device=dist.device(args.device))
    with_adapters(pipe, [parse_adapter_arg(a) for a in args.adapter])
    images = generate(pipe, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, n=args.n)
    print(f"wrote {save_image(grid(images), args.out)}")


def main(argv=None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # its import-time warnings (torchao) are not ours to print
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's import-time deprecations
    args = build_parser().parse_args(argv)
    handler = {
        "analyze": cmd_analyze,
        "compress": cmd_compress,
        "evaluate": cmd_evaluate,
        "export": cmd_export,
        "customize": cmd_customize,
        "generate": cmd_generate,
    }.get(args.command, cmd_demo)
    try:
        from .core.dist import check_device

        check_device(getattr(args, "device", None))
        return handler(args) or 0
    except ComcatError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_ABORTED
