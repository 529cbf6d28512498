"""Models from the Hugging Face hub and transformers folders: hub reachability (one line instead of
the hub's retries when offline), and transformers encoders (families/hf_encoders.py) built from a
config or loaded from a folder (config.json + weights) or a hub id (org/name)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from torch import nn

from ..core.errors import ComcatError, first_line
from .families.hf_encoders import CLASSES, LAYOUTS, SUPPORTED, wrap

_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"  # the hub's rule for an owner or a repository name
HUB_ID = re.compile(rf"(?!.*(?:--|\.\.)){_PART}/{_PART}")  # org/name on the Hugging Face hub
HUB_ID_RULE = (
    "a hub id is org/name: letters, digits, '-', '_' and '.', each part at most 96 characters, "
    "not starting or ending with '-' or '.', without '--' or '..'"
)
TRANSFORMERS = "transformers:"  # architecture names of transformers models: transformers:ViTForImageClassification
TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}  # two-tower checkpoints load as their vision tower
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def check_reachable(name: str, hub_id: str | None = None, files=("model.safetensors", "pytorch_model.bin")) -> None:
    """Fail at once, not after the hub's retries, when `name`'s files (of `hub_id`, by default its
    timm pretrained config's) are neither in the local hub cache nor downloadable (offline mode, or
    no answer from the hub within 3 s)."""
    import socket

    from huggingface_hub import constants, try_to_load_from_cache

    if hub_id is None:
        from timm.models import get_pretrained_cfg

        hub_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    if hub_id and any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in files):
        return  # cached: no network needed
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    why = "offline mode (HF_HUB_OFFLINE)" if offline else None
    if why is None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError:
            why = "the hub does not answer"
    if why:
        raise ComcatError(
            f"the pretrained weights of {name} are not on this machine and cannot be downloaded ({why}): "
            "download them where there is network, or use a local checkpoint file"
        )


def _allowed() -> set[str]:
    return {c for cs in CLASSES.values() for c in cs}


def build_transformers(class_name: str, config: dict | None = None) -> nn.Module:
    """A randomly initialised transformers encoder of class `class_name` from a config dict, wrapped."""
    import transformers

    if class_name not in _allowed() or not isinstance(config, dict) or config.get("model_type") not in LAYOUTS:
        raise ComcatError(f"transformers:{class_name} with this config is not a model comcat supports: use {SUPPORTED}")
    cls = getattr(transformers, class_name)
    try:
        cfg = cls.config_class.from_dict(config)
    except Exception as e:
        raise ComcatError(f"the {class_name} config is invalid ({first_line(e)}): export the model again") from None
    return wrap(cls(cfg).eval())


def hub_snapshot(hub_id: str) -> str:
    """The local folder of a hub repository's config, weights and tokenizer files (from the hub cache,
    or downloaded into it): a hub id is never read as a path on this machine."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(hub_id, allow_patterns=["*.json", "pytorch_model.bin", "*.txt", "*.model"])
    except Exception as e:
        raise ComcatError(f"could not get {hub_id} from the hub ({first_line(e)}): check the hub id") from None
    return folder


def read_config(source: str, where: str, hub: bool = False) -> dict:
    """config.json of a local folder or (hub=True) a hub repository (from the cache, or downloaded)."""
    if not hub and Path(where).is_dir():
        path = Path(where) / "config.json"
        if not path.is_file():
            raise ComcatError(f"{where} has no config.json: pass a folder written by save_pretrained, or a file")
    else:
        check_reachable(source, where, ("config.json",))
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(where, "config.json"))
        except Exception as e:
            raise ComcatError(f"could not get {where}'s config.json ({first_line(e)}): check the hub id") from None
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ComcatError(f"{source}: config.json is not valid JSON: export the model again") from None
    if not isinstance(cfg, dict):
        raise ComcatError(f"{source}: config.json holds no settings: export the model again")
    return cfg


def _class_for(source: str, cfg: dict) -> str:
    """The transformers class comcat loads a config as; ComcatError naming the missing family."""
    kind = cfg.get("model_type")
    if kind in TOWERS:
        return TOWERS[kind]
    named = next((a for a in cfg.get("architectures") or [] if a in _allowed()), None)
    if named:
        return named
    if kind in CLASSES:
        return CLASSES[kind][0]  # e.g. BertForMaskedLM weights load as BertModel
    raise ComcatError(
        f"{source} is a transformers {kind or 'unknown'} model, a family comcat does not support yet: use {SUPPORTED}"
    )


def _preprocessing(folder: str) -> dict:
    """timm-style data settings (mean, std, interpolation, crop) from preprocessor_config.json, if any."""
    try:
        path = Path(folder) / "preprocessor_config.json"
        pre = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        pre = {}
    out = {}
    if isinstance(pre.get("image_mean"), list) and isinstance(pre.get("image_std"), list):
        out.update(mean=tuple(pre["image_mean"]), std=tuple(pre["image_std"]))
    if pre.get("resample") in RESAMPLE:
        out["interpolation"] = RESAMPLE[pre["resample"]]
    size, crop = pre.get("size"), pre.get("crop_size")
    edge = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if pre.get("do_center_crop") and isinstance(edge, int) and isinstance(crop, int) and edge > 0:
        out["crop_pct"] = crop / edge
    elif isinstance(edge, int):
        out["crop_pct"] = 1.0
    return out


def sentence_pooling(folder: Path) -> tuple[str, str, bool] | None:
    """A sentence-transformers folder's (transformer sub-path, pooling mode, normalize) from its
    modules.json and pooling config; None for any other folder."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text())
        kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
        pooling = json.loads((folder / kinds["Pooling"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ComcatError(
            f"{folder} has a modules.json but no readable Transformer and Pooling modules: save it again with "
            "sentence-transformers"
        ) from None
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
    modes = [m for m, k in keys.items() if pooling.get(k)]
    others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in keys.values()]
    if len(modes) != 1 or others:
        raise ComcatError(
            f"{folder} pools by {', '.join(modes + others) or 'nothing'}: comcat follows cls, mean or max pooling"
        )
    return kinds.get("Transformer", ""), modes[0], "Normalize" in kinds


def load_transformers(source: str, where: str, hub: bool, cfg: dict, pooling: tuple[str, bool] | None = None):
    """A transformers encoder from a local folder or a hub id whose config.json is `cfg`: returns
    (model, architecture name, {"config": ...}), enough to rebuild it without the original.
    `pooling` (mode, normalize): a sentence-transformers folder's, kept in the config."""
    import transformers

    name = _class_for(source, cfg)
    if hub:
        check_reachable(source, where, ("model.safetensors", "pytorch_model.bin"))
    folder = hub_snapshot(where) if hub else where
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # comcat says in one line what is wrong, below
    try:
        hf, info = getattr(transformers, name).from_pretrained(folder, output_loading_info=True)
    except Exception as e:
        why = "tensor shapes differ from config.json" if "mismatched" in str(e) else first_line(e)
        raise ComcatError(
            f"could not load {source} as {name} ({why}): its weights do not match its config.json, "
            "or are missing; export the model again with save_pretrained"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ComcatError(
            f"{source}: its weights lack {len(missing)} tensors that {name} needs (e.g. {missing[0]}): the weights "
            "do not match config.json; export the model again with save_pretrained"
        )
    if pooling is not None:
        hf.config.comcat_pooling, hf.config.comcat_normalize = pooling  # saved with the config, rebuilt with it
    model = wrap(hf.eval())
    model.pretrained_cfg.update(_preprocessing(folder))
    if model.text:
        model.pretrained_cfg["tokenizer"] = where  # its tokenizer, for sentence data (texts.py)
    return model, TRANSFORMERS + name, {"config": json.loads(hf.config.to_json_string(use_diff=False))}
