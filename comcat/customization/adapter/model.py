"""Putting adapters into a UNet (through `set_attn_processor`), saving and loading them.

An adapter file is `adapter.safetensors`: tensors `<attention>.{A,B,P,R}` (fp16 by default),
optionally `token_embedding`, and metadata holding the AdapterConfig as JSON.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from safetensors import safe_open
from safetensors.torch import save_file

from ...core.errors import ComcatError
from ...core.files import atomic_write
from .config import AdapterConfig
from .flux import ComcatFluxAttnProcessor, is_flux
from .joint import ComcatJointAttnProcessor, JointHeadLowRank
from .layer import ComcatAttnProcessor, low_rank_layer

ADAPTER_FILE = "adapter.safetensors"
SUFFIX = ".processor"


def _unet(target):
    """A pipeline or its denoiser -> the denoiser (a UNet, or the transformer of PixArt, Sana, SD3)."""
    for attr in ("unet", "transformer"):
        if getattr(target, attr, None) is not None:
            return getattr(target, attr)
    return target


def attention_sites(unet) -> dict[str, Attention]:
    """Every attention of the UNet by processor name minus '.processor' (e.g. '...attn2')."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention) or is_flux(m)}


def site_kind(attn) -> str:
    """'joint' (SD3's and Flux's double-stream image + context attention), 'cross' or 'self' (Flux's
    single-stream blocks: self-attention over the joint sequence)."""
    if attn.added_kv_proj_dim is not None and (is_flux(attn) or attn.context_pre_only is not None):
        return "joint"
    return "self" if is_flux(attn) or not attn.is_cross_attention else "cross"


def out_features(attn) -> int:
    """The width of the attention's output: to_out's, or Flux single-stream's H d (no to_out)."""
    return attn.to_out[0].out_features if getattr(attn, "to_out", None) is not None else attn.to_q.out_features


def output_projection(unet, site: str, attn) -> tuple[str, torch.Tensor]:
    """(path, weight (Co, H d)) of the attention's output projection W^O: to_out.0, or in a Flux
    single-stream block (no to_out) the columns of the block's proj_out that take the attention's output."""
    if getattr(attn, "to_out", None) is not None:
        return f"{site}.to_out.0", attn.to_out[0].weight
    path = f"{site.rpartition('.')[0]}.proj_out"
    return path, unet.get_submodule(path).weight[:, : attn.to_q.out_features]


def joint_parts(config: AdapterConfig) -> tuple:
    """The JointHeadLowRank parts an adapter puts in a joint attention: its targets on the image
    stream ('self', 'cross'), and 'context' when config.stream takes the context stream."""
    image = tuple(t for t in config.targets if t in ("self", "cross")) if config.stream != "context" else ()
    return image + (("context",) if config.stream in ("context", "both") else ())


def linear_attention(attn: Attention) -> bool:
    """Whether the attention is linear (Sana's self-attention: ReLU feature maps, no softmax logits,
    so no per-head W^QK_h for an adapter to update)."""
    return "LinearAttn" in type(attn.processor).__name__


def _layer(attn: Attention, config: AdapterConfig, original):
    """A fresh adapter layer for one attention whose own processor is `original`, or None when the
    config does not target it."""
    kind = site_kind(attn)
    if linear_attention(attn):
        return None
    if kind == "joint":
        # the last SD3 block's context output is discarded: no context part there
        parts = tuple(p for p in joint_parts(config) if p != "context" or not attn.context_pre_only)
        dims = (attn.to_q.in_features, attn.add_k_proj.in_features)
        return JointHeadLowRank(*dims, attn.heads, config.rank, parts, config.shared_basis) if parts else None
    if is_flux(attn):  # single stream: one attention over [C; X], the 'self' part over all of it
        if "self" not in config.targets or config.stream == "context":
            return None
        dim = attn.to_q.in_features
        return JointHeadLowRank(dim, dim, attn.heads, config.rank, ("self",), config.shared_basis)
    if kind not in config.targets or (isinstance(original, JointAttnProcessor2_0) and config.stream == "context"):
        return None  # (SD3.5's second attention is the image stream's own)
    dims = (attn.to_q.in_features, attn.to_k.in_features, out_features(attn))
    return low_rank_layer(*dims, attn.heads, config.rank, config.shared_basis)


def fingerprint(unet) -> str:
    """A short hash of every attention's name, kind, heads and widths: equal for the same architecture."""
    rows = [
        f"{n}:{site_kind(a)}:{a.heads}:{a.to_q.in_features}:{a.to_k.in_features}:{out_features(a)}"
        for n, a in sorted(attention_sites(unet).items())
    ]
    return hashlib.sha1("\n".join(rows).encode()).hexdigest()[:16]


def _processors(unet) -> dict[str, object]:
    """attention site -> its processor; a model without diffusers' `attn_processors` (a bare
    Transformer2DModel) is read attention by attention."""
    if hasattr(unet, "attn_processors"):
        return {name[: -len(SUFFIX)]: proc for name, proc in unet.attn_processors.items()}
    return {site: attn.processor for site, attn in attention_sites(unet).items()}


def _install(unet, procs: dict[str, object]) -> None:
    if hasattr(unet, "set_attn_processor"):
        unet.set_attn_processor({name + SUFFIX: proc for name, proc in procs.items()})
        return
    for site, proc in procs.items():
        unet.get_submodule(site).set_processor(proc)


def adapter_names(target) -> list[str]:
    names = []
    for proc in _processors(_unet(target)).values():
        if isinstance(proc, ComcatAttnProcessor):
            names += [n for n in proc.adapters if n not in names]
    return names


def add_adapter(target, config: AdapterConfig, name: str = "default") -> list[torch.nn.Parameter]:
    """Give every targeted attention a fresh HeadLowRank called `name`; returns its parameters.

    The adapted UNet computes exactly what the base computed until B or R move from zero.
    """
    unet = _unet(target)
    if name in adapter_names(unet):
        raise ComcatError(f"an adapter called {name!r} is already loaded: unload it or choose another name")
    sites = attention_sites(unet)
    if not sites:
        raise ComcatError(_nothing_to_adapt(unet, config))
    procs = _processors(unet)
    ref = next(iter(unet.parameters()))
    params = []
    for site, attn in sites.items():
        original = procs[site].base if isinstance(procs[site], ComcatAttnProcessor) else procs[site]
        layer = _layer(attn, config, original)
        if layer is None:
            continue
        cls = ComcatFluxAttnProcessor if is_flux(attn) else ComcatAttnProcessor
        cls = ComcatJointAttnProcessor if cls is ComcatAttnProcessor and site_kind(attn) == "joint" else cls
        proc = procs[site] if isinstance(procs[site], cls) else cls(base=original)
        proc.add(name, layer.to(ref.device), config.scale)
        procs[site] = proc
        params += list(layer.parameters())
    if not params:
        raise ComcatError(_nothing_to_adapt(unet, config))
    _install(unet, procs)
    return params


def _nothing_to_adapt(model, config: AdapterConfig) -> str:
    """Why `add_adapter` found no attention to adapt in `model`, in one line."""
    if not attention_sites(model):
        return (
            f"{type(model).__name__} has no attention comcat can adapt: comcat adapts UNets (SD 1.x/2.x, SDXL), "
            "PixArt, Sana's cross-attention, SD3/SD3.5 and Flux"
        )
    if any(linear_attention(a) for a in attention_sites(model).values()):
        return (
            "this model's self-attention is linear (Sana: no softmax logits, so no per-head W^QK to update): "
            "adapt its cross-attention (targets: cross)"
        )
    return f"this model has no {'/'.join(config.targets)}-attention to adapt"


def adapter_parameters(target, name: str = "default") -> dict[str, torch.nn.Parameter]:
    """'<attention>.<A|B|P|R>' -> the parameter, for one adapter."""
    out = {}
    for site, proc in _processors(_unet(target)).items():
        if isinstance(proc, ComcatAttnProcessor) and name in proc.adapters:
            for key, p in proc.adapters[name].named_parameters():
                out[f"{site}.{key}"] = p
    if not out:
        raise ComcatError(f"no adapter called {name!r} is loaded (loaded: {adapter_names(target) or 'none'})")
    return out


def set_adapter_scale(target, name: str, scale: float) -> None:
    """Set the strength alpha of adapter `name` everywhere (0 turns it off)."""
    if not math.isfinite(scale):
        raise ComcatError(f"the adapter strength must be a finite number, got {scale}")
    adapter_parameters(target, name)
    for proc in _processors(_unet(target)).values():
        if isinstance(proc, ComcatAttnProcessor) and name in proc.adapters:
            proc.scales[name] = float(scale)


def unload_adapter(target, name: str | None = None) -> None:
    """Remove adapter `name` (all adapters when None); attentions left without one get their own
    processor back. When no adapter is left in a pipeline, its tokenizer and token
    embeddings are what they were before the first adapter added its token."""
    unet = _unet(target)
    if name is not None:
        adapter_parameters(unet, name)
    procs = _processors(unet)
    for site, proc in procs.items():
        if isinstance(proc, ComcatAttnProcessor):
            for n in [n for n in proc.adapters if name is None or n == name]:
                proc.remove(n)
            if not proc.adapters:
                procs[site] = proc.base or AttnProcessor2_0()
    _install(unet, procs)
    if not adapter_names(unet):
        _restore_text(target)


def _keep_text(pipe) -> None:
    """Before an adapter adds or changes a token: keep the tokenizer and the embedding table."""
    if getattr(pipe, "_comcat_text", None) is None:
        pipe._comcat_text = (copy.deepcopy(pipe.tokenizer), _token_embeddings(pipe).weight.detach().clone())


def _restore_text(pipe) -> None:
    """The tokenizer and embedding table _keep_text kept, back in place (exactly)."""
    kept = getattr(pipe, "_comcat_text", None)
    if kept is None:
        return
    tokenizer, table = kept
    pipe.tokenizer = tokenizer
    pipe.text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        _token_embeddings(pipe).weight.copy_(table)
    pipe._comcat_text = None


def _token_embeddings(pipe):
    text_encoder = getattr(pipe, "text_encoder", None)
    return None if text_encoder is None else text_encoder.get_input_embeddings()


def save_adapter(
    pipe, config: AdapterConfig, path: str | Path, name: str = "default", dtype: torch.dtype = torch.float16
) -> Path:
    """Write adapter `name` of `pipe` (and the learned token row, if any) to `path`
    (a folder gets adapter.safetensors), atomically. Returns the file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / ADAPTER_FILE
    tensors = {k: p.detach().to("cpu", dtype).contiguous() for k, p in adapter_parameters(pipe, name).items()}
    if config.token_embedding:
        tok_id = pipe.tokenizer.convert_tokens_to_ids(config.token)
        tensors["token_embedding"] = _token_embeddings(pipe).weight[tok_id].detach().to("cpu", torch.float32).clone()
    config.fingerprint = config.fingerprint or fingerprint(_unet(pipe))
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=config.to_metadata()))


def read_adapter(path: str | Path) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise ComcatError(f"no adapter at {path}: give a customize --out folder or an adapter .safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ComcatError(f"{path} is not a readable safetensors file ({type(e).__name__})") from None
    config = AdapterConfig.from_metadata(meta, str(path))
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise ComcatError(
                f"{path}: {k} holds {t.dtype} numbers, an adapter holds floats: save it again with comcat"
            )
        if not torch.isfinite(t).all():
            raise ComcatError(f"{path}: {k} holds NaN or inf values: the adapter is broken, train it again")
    return config, tensors


def add_token(pipe, token: str, init: torch.Tensor | None = None) -> int:
    """Make `token` one token of the pipeline's tokenizer (adding it and an embedding row when
    new; the row starts at `init` or at the mean embedding). Returns its id."""
    tokenizer = pipe.tokenizer
    if token in tokenizer.get_vocab():
        tok_id = tokenizer.convert_tokens_to_ids(token)
    else:
        tokenizer.add_tokens([token])
        pipe.text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        tok_id = tokenizer.convert_tokens_to_ids(token)
        emb = _token_embeddings(pipe).weight
        with torch.no_grad():
            emb[tok_id] = emb[:tok_id].mean(0) if init is None else init.to(emb)
    if init is not None:
        with torch.no_grad():
            _token_embeddings(pipe).weight[tok_id] = init.to(_token_embeddings(pipe).weight)
    return tok_id


def train_token_row(pipe, token: str) -> tuple[torch.nn.Parameter, int]:
    """Make `token` a token of the pipeline (`add_token`) and its embedding row the only trainable
    part of the text encoder (the other rows' gradients are masked to zero).
    Returns (the embedding table, the token's id)."""
    tok_id = add_token(pipe, token)
    pipe.text_encoder.requires_grad_(False)
    emb = _token_embeddings(pipe).weight
    emb.requires_grad_(True)
    keep = torch.zeros_like(emb[:, :1])
    keep[tok_id] = 1
    emb.register_hook(lambda g: g * keep)
    return emb, tok_id


def load_adapter(pipe, path: str | Path, scale: float | None = None, name: str | None = None) -> str:
    """Load an adapter file into `pipe` as `name` (default: the file's folder name) at strength
    `scale` (default: the file's). Refuses a file made for another UNet architecture."""
    config, tensors = read_adapter(path)
    unet = _unet(pipe)
    if scale is not None and not math.isfinite(scale):
        raise ComcatError(f"the adapter strength must be a finite number, got {scale}")
    if config.fingerprint and config.fingerprint != fingerprint(unet):
        raise ComcatError(
            f"{path} was made for another base model ({config.base_model or 'unknown'}): "
            "load it into the pipeline it was trained on"
        )
    name = name or Path(path).resolve().with_suffix("").name.replace(".", "_")
    if name == Path(ADAPTER_FILE).stem:
        name = Path(path).resolve().parent.name if Path(path).suffix else Path(path).resolve().name
    params = None
    if scale is not None:
        config.scale = float(scale)
    add_adapter(unet, config, name)
    try:
        params = adapter_parameters(unet, name)
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise ComcatError(
                f"{path} lacks {len(missing)} adapter tensors (e.g. {missing[0]}): it is incomplete or for "
                "another model"
            )
        with torch.no_grad():
            for k, p in params.items():
                if tensors[k].shape != p.shape:
                    raise ComcatError(
                        f"{path}: {k} has shape {tuple(tensors[k].shape)}, the model needs "
                        f"{tuple(p.shape)}: it was made for another base model"
                    )
                p.copy_(tensors[k])
        if "token_embedding" in tensors:
            _keep_text(pipe)
            table = _token_embeddings(pipe)
            width = None if table is None else table.weight.shape[1]
            if tuple(tensors["token_embedding"].shape) != (width,):
                raise ComcatError(
                    f"{path}: the token embedding has shape {tuple(tensors['token_embedding'].shape)}, "
                    f"this pipeline's text encoder needs ({width},): it was made for another base model"
                )
            add_token(pipe, config.token, tensors["token_embedding"])
    except BaseException:
        unload_adapter(unet, name)
        raise
    return name
