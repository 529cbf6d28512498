"""Hugging Face transformers encoders: ViT, DeiT (with the distilled two-token model), DINOv2,
CLIP and SigLIP vision towers, and BERT-family text encoders.

`wrap(hf_model)` returns a `TransformersModel`: forward(x) gives the classifier logits, or the
pooled embedding when there is no classifier. Each layer's attention is replaced, exactly, by an
`AttentionSlot` holding comcat's canonical attention (families/base.py) built from the layer's own
q, k, v, o projections; the slot takes the layer's call (hidden_states, attention_mask, ...) and
hands the mask to scaled_dot_product_attention, which reads both masks transformers makes (the
additive float mask of "eager" and the boolean one of "sdpa"). Post-norm encoders (BERT) keep their
residual + LayerNorm inside the slot, where BertSelfOutput had it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...core.errors import ComcatError
from .base import Family, canonical_attention, check_attention


@dataclass(frozen=True)
class Layout:
    """Where a layer keeps its attention and MLP (dotted paths): attention relative to the layer;
    q, k, v, o relative to the attention; post_norm (relative to the attention) for post-norm
    encoders; fc1, fc2 relative to the layer."""

    attention: str
    q: str
    k: str
    v: str
    o: str
    fc1: str
    fc2: str
    post_norm: str | None = None


_VIT = Layout("attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp.fc1", "mlp.fc2")
_CLIP = Layout("self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")
_BERT = Layout(
    "attention", "self.query", "self.key", "self.value", "output.dense", "intermediate.dense", "output.dense",
    post_norm="output.LayerNorm",
)  # fmt: skip
LAYOUTS = {
    "vit": _VIT,
    "deit": _VIT,
    "dinov2": _VIT,
    "clip_vision_model": _CLIP,
    "siglip_vision_model": _CLIP,
    "clip_text_model": _CLIP,
    "bert": _BERT,
}
CAUSAL = ("clip_text_model",)  # text towers whose tokens attend only to earlier ones
# the top-level classes comcat loads; a full CLIP / SigLIP checkpoint loads as its vision tower
CLASSES = {
    "vit": ("ViTModel", "ViTForImageClassification"),
    "deit": ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
    "dinov2": ("Dinov2Model", "Dinov2ForImageClassification"),
    "clip_vision_model": ("CLIPVisionModel",),
    "siglip_vision_model": ("SiglipVisionModel",),
    "clip_text_model": ("CLIPTextModel",),
    "bert": ("BertModel", "BertForSequenceClassification"),
}
CLASSIFIERS = ("classifier", "cls_classifier", "distillation_classifier")
TEXT_TOKENS = 128  # the sequence length the cost model and latency use for a text encoder
SUPPORTED = "transformers ViT, DeiT, DINOv2, CLIP / SigLIP vision, CLIP text and BERT encoders"


class AttentionSlot(nn.Module):
    """Stands where a transformers layer keeps its attention: out = attn(x, attn_mask) (post-norm:
    norm(dropout(out) + x)); returns (out, None), the (output, weights) pair the layer unpacks. In a
    causal text tower (CLIP's) a missing mask means the causal one (transformers' mask, when it
    makes one, already holds it)."""

    def __init__(self, attn: nn.Module, kind: str, norm: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        self.attn, self.norm, self.dropout = attn, norm, nn.Dropout(dropout)
        self.kind = kind  # the model type, naming the layer's Layout

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        causal = attention_mask is None and self.kind in CAUSAL
        out = self.attn(hidden_states, attn_mask=attention_mask, is_causal=causal)
        if self.norm is not None:
            out = self.norm(self.dropout(out) + hidden_states)
        return out, None


class _Inject(nn.Module):
    """A stand-in layer list entry that ignores its input and returns fixed tokens."""

    def __init__(self, h: torch.Tensor):
        super().__init__()
        self.h = h

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.h


class TransformersModel(nn.Module):
    """A transformers encoder as comcat runs it. x: pixel values (B, 3, H, W), or token ids (B, N)
    for a text encoder (id 0 and the pad id are masked out) -> logits (B, classes) or the pooled
    embedding (B, C) when it has no classifier (pooler_output, else the first token). A
    sentence-transformers encoder pools as its folder says (config.comcat_pooling: "cls", "mean" or
    "max" over the unpadded tokens; config.comcat_normalize: then to unit length)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        cfg = hf.config
        self.model_type = cfg.model_type
        self.text = cfg.model_type in ("bert", "clip_text_model")
        self.pooling = getattr(cfg, "comcat_pooling", None)  # sentence-transformers pooling, if any
        self.normalize = bool(getattr(cfg, "comcat_normalize", False))
        heads = [m for n in CLASSIFIERS if hasattr(m := getattr(hf, n, None), "out_features")]
        self.num_classes = heads[0].out_features if heads else 0
        size = getattr(cfg, "image_size", 224)
        tokens = min(TEXT_TOKENS, getattr(cfg, "max_position_embeddings", TEXT_TOKENS))  # CLIP text: 77
        self.pretrained_cfg = {
            "architecture": type(hf).__name__,
            "input_size": (tokens,) if self.text else (getattr(cfg, "num_channels", 3), size, size),
        }
        attention = LAYOUTS[self.model_type].attention
        self.layers_path = next(  # dotted path (in self) of the ModuleList of encoder layers
            (
                n
                for n, m in self.named_modules()
                if isinstance(m, nn.ModuleList) and len(m) and hasattr(m[0], attention)
            ),
            None,
        )
        if self.layers_path is None:
            raise ComcatError(f"{type(hf).__name__} has no encoder layers comcat can find")
        names = [str(n) for _, n in sorted((int(i), n) for i, n in (getattr(cfg, "id2label", None) or {}).items())]
        if self.num_classes not in (0, 1000) and len(names) == self.num_classes and names[0] != "LABEL_0":
            self.pretrained_cfg["label_names"] = names  # folders named after the classes map by name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.text:
            mask = x != pad_id(self)
            out = self.hf(input_ids=x, attention_mask=mask.long())
            if self.pooling is not None:
                return pool(out.last_hidden_state, mask, self.pooling, self.normalize)
        else:
            out = self.hf(pixel_values=x)
        if getattr(out, "logits", None) is not None:
            return out.logits
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


def pad_id(model: nn.Module) -> int:
    """The token id a text encoder masks out (its config's pad id, else 0)."""
    return getattr(model.hf.config, "pad_token_id", None) or 0


def pool(h: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool = False) -> torch.Tensor:
    """Sentence embeddings (B, C) from token states h (B, N, C) and the tokens' mask (B, N):
    the first token ("cls"), the mean or the max over the unmasked ones; to unit length with normalize."""
    m = mask[..., None].to(h.dtype)
    if mode == "cls":
        e = h[:, 0]
    elif mode == "mean":
        e = (h * m).sum(1) / m.sum(1).clamp_min(1)
    else:
        e = h.masked_fill(m == 0, float("-inf")).amax(1)
    return torch.nn.functional.normalize(e, dim=-1) if normalize else e


def _get(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path)


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, new)


def _slot(layer: nn.Module, layout: Layout, cfg) -> AttentionSlot:
    """The AttentionSlot equal to a layer's transformers attention."""
    attn = _get(layer, layout.attention)
    q, k, v, o = (_get(attn, p) for p in (layout.q, layout.k, layout.v, layout.o))
    heads = cfg.num_attention_heads
    owner = _get(attn, layout.q.rpartition(".")[0])  # the module holding q (BERT: attention.self)
    scale = getattr(owner, "scaling", None) or getattr(owner, "scale", None) or (q.out_features // heads) ** -0.5
    norm = _get(attn, layout.post_norm) if layout.post_norm else None
    drop = getattr(cfg, "hidden_dropout_prob", 0.0) if norm is not None else 0.0
    return AttentionSlot(canonical_attention(q, k, v, o, heads, float(scale)), cfg.model_type, norm, drop)


def wrap(hf: nn.Module) -> TransformersModel:
    """A transformers model as a TransformersModel, every layer's attention in an exact
    AttentionSlot; ComcatError for unsupported types and layouts."""
    cfg = hf.config
    layout = LAYOUTS.get(cfg.model_type)
    if layout is None or type(hf).__name__ not in CLASSES.get(cfg.model_type, ()):
        raise ComcatError(
            f"{type(hf).__name__} ({cfg.model_type}) is not a model comcat supports: use {SUPPORTED} "
            f"({', '.join(c for cs in CLASSES.values() for c in cs)})"
        )
    if getattr(cfg, "use_swiglu_ffn", False):
        raise ComcatError(f"{type(hf).__name__} uses a SwiGLU MLP: use a DINOv2 model with the plain MLP")
    if getattr(cfg, "is_decoder", False):
        raise ComcatError(f"{type(hf).__name__} is a decoder: comcat compresses encoders")
    model = TransformersModel(hf)
    for layer in _get(model, model.layers_path):
        _set(layer, layout.attention, _slot(layer, layout, cfg))
    return model.eval()


def _prefix_tokens(model: TransformersModel) -> int:
    """Tokens before the patches: class (+ DeiT's distillation) token; SigLIP has none."""
    return {"deit": 2, "siglip_vision_model": 0}.get(model.model_type, 1)


class Transformers(Family):
    name = "transformers encoder"

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, TransformersModel)

    def owns_block(self, block: nn.Module) -> bool:
        return any(isinstance(m, AttentionSlot) for m in block.children())

    def _slot(self, block: nn.Module) -> AttentionSlot:
        return next(m for m in block.children() if isinstance(m, AttentionSlot))

    def _layout(self, block: nn.Module) -> Layout:
        return LAYOUTS[self._slot(block).kind]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_get(model, model.layers_path))

    def check(self, model: nn.Module) -> None:
        for i, b in enumerate(self.blocks(model)):
            check_attention(self.attention(b), f"layer {i} attention")

    def attention(self, block: nn.Module) -> nn.Module:
        return self._slot(block).attn

    def set_attention(self, block: nn.Module, module: nn.Module) -> None:
        self._slot(block).attn = module

    def mlp(self, block: nn.Module) -> dict[str, nn.Module]:
        layout = self._layout(block)
        return {"fc1": _get(block, layout.fc1), "fc2": _get(block, layout.fc2)}

    def set_mlp(self, block: nn.Module, name: str, module: nn.Module) -> None:
        _set(block, getattr(self._layout(block), name), module)

    def run_block(self, block: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """block(h, mask): the keys of padded tokens masked out (bool (B, 1, 1, N), True = attend; with
        the causal mask in a causal tower); no mask when nothing is padded (CLIP's layers take it
        positionally, required)."""
        mask = None
        if valid is not None and not bool(valid.all()):
            mask = valid[:, None, None, :]
            if self._slot(block).kind in CAUSAL:
                N = h.shape[1]
                mask = mask & torch.ones(N, N, dtype=torch.bool, device=h.device).tril()
        out = block(h, mask)
        return out[0] if isinstance(out, tuple) else out

    def token_mask(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return x != pad_id(model) if model.text else None

    def output(self, model: nn.Module, h: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The model run with its layer list standing in as one layer that returns h: the model's
        own final norm, pooling and classifier on h (the embeddings see a blank input; for a text
        encoder one padded where `valid` is False, so that it pools the unpadded tokens)."""
        if model.model_type == "clip_text_model":
            raise ComcatError(
                "a CLIP text tower pools each sentence at its end token, which only the token ids show: comcat "
                "compresses it without data (by SVD), as it reads no text data yet"
            )
        path = model.layers_path
        layers = _get(model, path)
        _set(model, path, nn.ModuleList([_Inject(h)]))
        x = self.example_input(model, h.shape[0], h.shape[1:2] if model.text else None)
        if model.text and valid is not None:
            pad = pad_id(model)
            x = torch.where(valid, torch.full_like(x, 2 if pad == 1 else 1), torch.full_like(x, pad))
        try:
            return model(x)
        finally:
            _set(model, path, layers)

    def classifiers(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: m for n in CLASSIFIERS if hasattr(m := getattr(model.hf, n, None), "in_features")}

    def set_classifier(self, model: nn.Module, name: str, module: nn.Module) -> None:
        setattr(model.hf, name, module)

    def read_tokens(self, model: nn.Module) -> list[int]:
        if model.pooling in ("mean", "max"):
            return []  # every token counts
        arch = type(model.hf).__name__
        if arch == "DeiTForImageClassificationWithTeacher":
            return [0, 1]
        if arch == "Dinov2ForImageClassification" or model.model_type == "siglip_vision_model":
            return []  # mean of the patch tokens / attention pooling read every token
        return [0]

    def num_tokens(self, model: nn.Module) -> int:
        cfg = model.hf.config
        if model.text:
            return self.input_size(model)[0]
        return (cfg.image_size // cfg.patch_size) ** 2 + _prefix_tokens(model)

    def patch_flops(self, model: nn.Module) -> int:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            return 0
        patches = self.num_tokens(model) - _prefix_tokens(model)
        return 2 * patches * conv.weight.numel()

    def input_size(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(model.pretrained_cfg["input_size"])

    def example_input(self, model: nn.Module, batch: int = 1, input_size=None) -> torch.Tensor:
        if not model.text:
            return super().example_input(model, batch, input_size)
        tokens = (input_size or self.input_size(model))[0]
        vocab = model.hf.config.vocab_size
        return torch.randint(1, vocab, (batch, tokens), device=next(model.parameters()).device)

    def describe(self, model: nn.Module) -> str:
        pooled = (
            f", sentence-transformers {model.pooling} pooling{' normalized' if model.normalize else ''}"
            if model.pooling
            else ""
        )
        return (
            f"{self.name} ({type(model.hf).__name__}, {model.model_type}{pooled}): per-head W^QK_h and W^VO_h of "
            "every layer's self-attention (the MLP linears too when asked)"
        )
