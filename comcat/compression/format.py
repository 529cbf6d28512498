"""The compressed-model format: a folder of model.safetensors + comcat.json (architecture, ranks,
source, report), written as one unit and validated before anything is allocated."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.errors import ComcatError
from ..core.files import usual_mode
from ..core.records import read_json
from . import families
from .convert import compress
from .cost import count_params, counted_flops
from .hub import TRANSFORMERS
from .models import Loaded, build_arch, check_finite, load_state
from .quantize import QUANTIZATIONS, dequantized_state, int8_state, load_int8
from .ranks import RankConfig

COMPRESSED_META = "comcat.json"


COMPRESSED_WEIGHTS = "model.safetensors"


def read_meta(directory: Path) -> dict:
    settle(directory)
    meta_path = directory / COMPRESSED_META
    if not meta_path.is_file():
        raise ComcatError(
            f"{directory} is not a compressed model: it has no {COMPRESSED_META} "
            "(make one with 'comcat compress ... --out DIR')"
        )
    return read_json(meta_path, "a compressed model's record", "re-export the compressed model")


FORMAT = "comcat-compressed/3"  # /3: ranks name the classifier "classifier" (was "head")
READABLE = (FORMAT, "comcat-compressed/2")  # /2: the query bias in W^QK_h's factors, no key-bias term


JOB_FILE = "job.json"  # a compress run's spec and phase (see comcat/job.py)


def save_compressed(loaded: Loaded, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `loaded.model` (compressed, with .comcat_ranks) to out_dir; replaces an existing one."""
    model, ranks = loaded.model, getattr(loaded.model, "comcat_ranks", None)
    if ranks is None:
        raise ComcatError("only compressed models can be saved as a comcat directory: run compress first")
    out = Path(out_dir)
    if out.exists() and not (out / COMPRESSED_META).is_file() and not (out / JOB_FILE).is_file() and any(out.iterdir()):
        raise ComcatError(f"{out} exists and is not a comcat model directory: choose an empty or new --out")
    meta = {
        "format": FORMAT,
        "arch": loaded.arch,
        "arch_kwargs": loaded.arch_kwargs,
        "source": loaded.source,
        "method": ranks.method,
        "ranks": ranks.to_dict(),
        "params": count_params(model),
        "flops": None if getattr(model, "comcat_quantized", None) else counted_flops(model),
        "pretrained_cfg": {
            k: v
            for k, v in (getattr(model, "pretrained_cfg", None) or {}).items()
            if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
        },
        **(extra or {}),
    }
    quantized = getattr(model, "comcat_quantized", None)
    if quantized:
        meta["quantized"] = quantized
        meta["flops"] = None  # torchao's int8 products are not float FLOPs; the float model's are in the report
    meta["pair"] = uuid.uuid4().hex  # the weights carry it too: a pair from two saves is detected
    state = int8_state(model)

    def write(folder: Path) -> None:
        save_file(state, str(folder / COMPRESSED_WEIGHTS), metadata={"format": FORMAT, "pair": meta["pair"]})
        (folder / COMPRESSED_META).write_text(json.dumps(meta, indent=2) + "\n")
        for name in (COMPRESSED_WEIGHTS, COMPRESSED_META):
            usual_mode(folder / name)

    out.parent.mkdir(parents=True, exist_ok=True)
    into_run = out.is_dir() and any(out.iterdir())  # a run's folder (job.json, state/): a journaled save
    tmp = Path(tempfile.mkdtemp(dir=out if into_run else out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        usual_mode(tmp, folder=True)
        os.replace(tmp, out / f"{JOURNAL}{meta['pair']}" if into_run else out)  # the commit point
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if into_run:
        settle(out)
    return out


JOURNAL = ".save."  # out/.save.<pair>/: a committed save whose two files are still being moved into place


def settle(folder: str | Path) -> None:
    """Finish a committed save that a kill interrupted: move the weights, then comcat.json, out of
    every journal folder into place, oldest first. A kill at any instant of a save leaves the old
    pair, or a journal that completes the new one; readers and the writer may both settle (each
    file is moved once). Nothing is done where the folder cannot be written."""
    folder = Path(folder)
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return
    journals = [p for p in folder.glob(f"{JOURNAL}*") if p.is_dir() and not p.name.endswith(".tmp")]
    for journal in sorted(journals, key=lambda p: p.stat().st_mtime):
        for name in (COMPRESSED_WEIGHTS, COMPRESSED_META):  # comcat.json last: it names the pair
            try:
                os.replace(journal / name, folder / name)
            except FileNotFoundError:  # moved already (by another reader, or before the kill)
                pass
        shutil.rmtree(journal, ignore_errors=True)


def _check_arch(meta: dict, weights: Path) -> None:
    """comcat.json's architecture checked against the tensor shapes stored in `weights` before any
    model is allocated: known keyword names and plain values only, the dense shapes that compression
    keeps (embeddings, norms, MLPs, classifier) and the number of blocks must match."""
    from safetensors import safe_open

    kwargs, arch = meta.get("arch_kwargs", {}), meta.get("arch")
    if not isinstance(arch, str) or not isinstance(kwargs, dict) or not _plain_kwargs(arch, kwargs):
        raise ComcatError(f"{weights.parent / 'comcat.json'} has an invalid arch / arch_kwargs: re-export the model")
    try:
        with safe_open(str(weights), "pt") as f:
            stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ComcatError(f"could not read {weights} ({type(e).__name__}): re-export the compressed model") from None
    width = stored.get("patch_embed.proj.weight", [None])[0]
    blocks = {int(k.split(".")[1]) for k in stored if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if kwargs.get("depth", len(blocks)) != len(blocks) or kwargs.get("embed_dim", width) != width:
        raise ComcatError(
            f"{weights.parent / 'comcat.json'} does not match {weights.name} (depth / width): "
            "re-export the compressed model"
        )
    try:
        with torch.device("meta"):  # shapes only, nothing allocated
            dense = families.prepare(build_arch(arch, **kwargs))
    except ComcatError:
        raise
    except Exception as e:
        raise ComcatError(
            f"{weights.parent / 'comcat.json'} describes no buildable model ({type(e).__name__}): "
            "re-export the compressed model"
        ) from None
    described = sum(p.numel() for p in dense.state_dict().values())
    held = sum(math.prod(shape) for shape in stored.values())
    if described > 4 * held + 2**20:  # compression never more than doubles a linear's parameters
        raise ComcatError(
            f"{weights.parent / 'comcat.json'} describes a model of {described:,} parameters, and {weights.name} "
            f"holds {held:,}: re-export the compressed model"
        )
    names = set(families.block_names(dense))  # "blocks.3.", "layers.1.blocks.0."...
    lists = {n[: n.rstrip(".").rfind(".") + 1] for n in names}  # the containers: "blocks.", "layers.1.blocks."
    stored_blocks = {
        f"{c}{i}." for k in stored for c in lists if k.startswith(c) and (i := k[len(c) :].split(".")[0]).isdigit()
    }
    for k in [k for k in stored if k.endswith(".qdata")]:  # an int8 weight: its shape is the weight's
        stored.setdefault(k[: -len(".qdata")], stored[k])
    for k in [k for k in stored if k.endswith(".up.bias")]:  # a low-rank MLP linear keeps its bias
        stored.setdefault(k.replace(".up.bias", ".bias"), stored[k])
    mlps = tuple(  # the MLP linears, which keeping neurons narrows
        f"{name}."
        for name, m in dense.named_modules()
        if any(m is lin for b in families.blocks(dense) for lin in families.mlp(b).values())
    )
    wrong = [
        k
        for k, p in dense.state_dict().items()  # attention is what compression reshapes
        if k in stored and ".attn." not in k and not k.startswith(mlps) and list(p.shape) != stored[k]
    ]
    wrong += [
        k
        for k in ("patch_embed.proj.weight", "pos_embed", "norm.weight")
        if k in stored and k not in wrong and k not in dense.state_dict()
    ]
    if wrong or stored_blocks != names:
        raise ComcatError(
            f"{weights.parent / 'comcat.json'} does not match {weights.name} "
            f"({wrong[0] if wrong else 'number of blocks'}): re-export the compressed model"
        )


def _plain_kwargs(arch: str, kwargs: dict) -> bool:
    """Whether arch_kwargs hold only what the architecture takes: a transformers config (plain JSON),
    or keyword arguments of timm's VisionTransformer, Beit, Eva or SwinTransformer with plain values."""
    import inspect

    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if arch.startswith(TRANSFORMERS):
        return set(kwargs) == {"config"} and isinstance(kwargs["config"], dict)
    known = set().union(
        *(inspect.signature(c.__init__).parameters for c in (VisionTransformer, Beit, Eva, SwinTransformer))
    ) - {"self"}
    return all(k in known and isinstance(v, (int, float, bool, str, list, type(None))) for k, v in kwargs.items())


def _check_pair(meta: dict, weights: Path) -> None:
    """comcat.json and model.safetensors come from the same save (files written before the pair id
    existed carry none and pass)."""
    from safetensors import safe_open

    if "pair" not in meta:
        return
    with safe_open(str(weights), "pt") as f:
        pair = (f.metadata() or {}).get("pair")
    if pair != meta["pair"]:
        raise ComcatError(
            f"{weights.parent}: comcat.json and {weights.name} come from different saves (a save was "
            "interrupted): continue the run with --resume, or compress again"
        )


def load_compressed(directory: str | Path) -> Loaded:
    """Rebuild a compressed model from its directory alone (no original checkpoint needed)."""
    directory = Path(directory)
    meta = read_meta(directory)
    if meta.get("format") not in READABLE:
        raise ComcatError(f"{directory} has format {meta.get('format')!r}, expected {FORMAT!r}: re-export it")
    _check_arch(meta, directory / COMPRESSED_WEIGHTS)
    _check_pair(meta, directory / COMPRESSED_WEIGHTS)
    model = families.prepare(build_arch(meta["arch"], **meta.get("arch_kwargs", {})))
    if meta.get("pretrained_cfg"):
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **meta["pretrained_cfg"]}
    compress(model, RankConfig.from_dict(meta["ranks"]), inplace=True)
    weights = directory / COMPRESSED_WEIGHTS
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise ComcatError(f"could not read {weights} ({type(e).__name__}): re-export the compressed model") from None
    quantized = meta.get("quantized")
    if quantized not in (None, *QUANTIZATIONS):
        raise ComcatError(f"{directory / COMPRESSED_META} names an unknown quantization {quantized!r}: re-export it")
    stored = state
    if quantized:
        state = dequantized_state(state, str(weights))
    check_finite(state, str(weights))
    load_state(model, state, f"{weights} does not match comcat.json", "re-export the compressed model")
    if quantized:
        load_int8(model, stored, str(weights))
    return Loaded(model.eval(), meta["arch"], meta.get("arch_kwargs", {}), str(directory), meta)
