"""Per model family: analysis time and CPU latency of a compressed model against dense, side by side.

For one base-size model of each family comcat supports, timm and transformers (random init: cost
does not depend on the weights; no download): the time of the full spectral analysis (matrix and
head level), and the latency at batch --batch of head-level models with uniform ranks keeping
--ratio of (a) the attention parameters and (b) the attention and MLP parameters, dense and
compressed timed alternately over --rounds rounds (median and range of the per-round ratios). A
transformers model is timed as transformers runs it ("as loaded", the baseline of its ratios), and
with comcat's exact canonical attention in its layers ("dense"). A text encoder (BERT) runs on
sequences of 128 tokens. timm models whose attention comcat replaces on loading (BEiT, EVA, rotary
ViTs, Swin, Swin V2) are timed as timm runs them too, the baseline of their ratios. CLIP's text
tower runs on its 77 tokens.

--spectra: the real ViT-Tiny of ../shared/data/ loaded through timm and re-saved as a transformers
ViT (benchmarks/timm_to_transformers.py): the largest difference of their spectra, and head-level
vs matrix-level attention parameters at 90% energy for both.

    python benchmarks/families.py [--batch 32] [--rounds 3] [--iters 1] [--json F] [--models ...] [--spectra]
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

from comcat.compression import families
from comcat.compression.analysis import analyze
from comcat.compression.convert import compress
from comcat.compression.cost import compare_latency
from comcat.compression.rank_rules import uniform_ranks
from comcat.core.files import atomic_write_text

FAMILIES = {  # family -> (timm name, keyword arguments): base size, 224 x 224 input
    "ViT": ("vit_base_patch16_224", {}),
    "DeiT": ("deit_base_patch16_224", {}),
    "DINOv2": ("vit_base_patch14_dinov2", {"img_size": 224}),
    "CLIP vision": ("vit_base_patch16_clip_224", {}),
    "SigLIP vision": ("vit_base_patch16_siglip_224", {}),
    "BEiT": ("beit_base_patch16_224", {}),
    "EVA-02": ("eva02_base_patch14_224", {}),
    "rotary ViT": ("vit_base_patch16_rope_reg1_gap_256", {}),
    "Swin": ("swin_base_patch4_window7_224", {}),
    "Swin V2": ("swinv2_base_window8_256", {}),
}
CONVERTED = ("BEiT", "EVA-02", "rotary ViT", "Swin", "Swin V2")  # attention replaced on loading: timm's own timed too
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
VISION = dict(BASE, image_size=224, patch_size=16)
HF_FAMILIES = {  # family -> (transformers class, its config class, config): base size
    "HF ViT": ("ViTForImageClassification", "ViTConfig", dict(VISION, num_labels=1000)),
    "HF DeiT": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(VISION, num_labels=1000)),
    "HF DINOv2": ("Dinov2Model", "Dinov2Config", dict(VISION, patch_size=14, mlp_ratio=4)),
    "HF CLIP vision": ("CLIPVisionModel", "CLIPVisionConfig", VISION),
    "HF SigLIP vision": ("SiglipVisionModel", "SiglipVisionConfig", VISION),
    "HF BERT": ("BertModel", "BertConfig", BASE),
    "HF CLIP text": (
        "CLIPTextModel",
        "CLIPTextConfig",
        dict(BASE, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    ),  # fmt: skip
}


def build(family: str):
    """(name, dense model as comcat runs it, the model as its library built it or None), random init.
    For a transformers model the second has comcat's canonical attention in every layer (the same
    function); the third is the untouched transformers model."""
    import copy

    if family in FAMILIES:
        name, kwargs = FAMILIES[family]
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        own = copy.deepcopy(model) if family in CONVERTED else None
        return name, families.prepare(model), own
    import transformers

    from comcat.compression.families.hf_encoders import TransformersModel, wrap

    cls, config_cls, cfg = HF_FAMILIES[family]
    if cls == "Dinov2Model":
        cfg = {k: v for k, v in cfg.items() if k != "intermediate_size"}
    hf = getattr(transformers, cls)(getattr(transformers, config_cls)(**cfg)).eval()
    return cls, wrap(copy.deepcopy(hf)), TransformersModel(hf).eval()


def spectra_check() -> dict:
    """The shared ViT-Tiny through timm and as a transformers ViT: spectra and 90%-energy params."""
    import tempfile
    from pathlib import Path

    from timm_to_transformers import SHARED_VIT, convert

    from comcat.compression.load import load_model

    if not SHARED_VIT.is_file():
        raise SystemExit(f"{SHARED_VIT} is missing: --spectra needs the shared ViT-Tiny")
    timm_vit = load_model(str(SHARED_VIT), "vit_tiny_patch16_224")
    with tempfile.TemporaryDirectory() as tmp:
        convert(timm_vit.model).save_pretrained(Path(tmp) / "vit")
        hf_vit = load_model(str(Path(tmp) / "vit"))
    a, b = analyze(timm_vit.model), analyze(hf_vit.model)
    diff = max(float(abs(a.matrix[m] - b.matrix[m]).max() / a.matrix[m].max()) for m in a.matrix)
    head_diff = max(float(abs(a.head[p] - b.head[p]).max() / a.head[p].max()) for p in a.head)
    out = {"loaded_as": [timm_vit.arch, hf_vit.arch], "max_rel_diff_matrix": diff, "max_rel_diff_head": head_diff}
    for label, s in (("timm", a), ("transformers", b)):
        out[label] = {"head_params_90": s.head_params(0.9), "matrix_params_90": s.matrix_params(0.9),
                      "dense_params": s.dense_params()}  # fmt: skip
    print(
        f"ViT-Tiny spectra, timm vs transformers: largest relative difference {diff:.1e} (matrix level), "
        f"{head_diff:.1e} (head level)"
    )
    for label in ("timm", "transformers"):
        r = out[label]
        print(f"  {label:12} at 90% energy: head level {r['head_params_90']:,}, matrix level "
              f"{r['matrix_params_90']:,} of {r['dense_params']:,} attention params")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=1)
    names = list(FAMILIES) + list(HF_FAMILIES)
    ap.add_argument("--models", nargs="+", choices=names, default=names)
    ap.add_argument("--spectra", action="store_true", help="also compare the ViT-Tiny spectra, timm vs transformers")
    ap.add_argument("--json", metavar="F", help="write the figures to this JSON file")
    args = ap.parse_args()
    results = {"batch": args.batch, "ratio": args.ratio, "rounds": args.rounds, "iters": args.iters,
               "threads": torch.get_num_threads(), "families": {}}  # fmt: skip
    print(f"batch {args.batch}, {args.rounds} alternating rounds of {args.iters} passes, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if args.spectra:
        results["spectra"] = spectra_check()
    for family in args.models:
        name, dense, as_loaded = build(family)
        t0 = time.perf_counter()
        analyze(dense)
        analysis_s = time.perf_counter() - t0
        models = {"dense": dense} if as_loaded is None else {"as loaded": as_loaded, "dense": dense}
        for label, mlp in (("attention", False), ("attention + MLP", True)):
            models[label] = compress(dense, uniform_ranks(dense, "head", args.ratio, mlp=mlp)).eval()
        with torch.inference_mode():
            size = (3, *dense.patch_embed.img_size) if family in FAMILIES else None  # the model's own input
            timing = compare_latency(models, args.batch, size, rounds=args.rounds, iters=args.iters, warmup=1)
        first = next(iter(models))  # the ratios' baseline: the model as its library runs it
        row = {"model": name, "analysis_s": analysis_s, "dense_ms": timing[first]["ms"], "baseline": first}
        for label in [n for n in models if n != first]:
            t = timing[label]
            row[label] = {"ms": t["ms"], "ratio": t["ratio"], "range": [t["ratio_min"], t["ratio_max"]]}
        results["families"][family] = row
        if args.json:  # after every family: a long run keeps what it measured
            atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(
            f"{family:16} {name:38} analysis {analysis_s:5.1f} s  {first} {row['dense_ms']:7.0f} ms  "
            + "  ".join(f"{k} {v['ratio']:.2f}x ({v['range'][0]:.2f}-{v['range'][1]:.2f})"
                        for k, v in row.items() if isinstance(v, dict))  # fmt: skip
            , flush=True,
        )  # fmt: skip


if __name__ == "__main__":
    main()
