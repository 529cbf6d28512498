"""int8 on top of a compressed model, by torchao: dynamic int8 linears (weights int8 per output row,
activations int8 per token, quantized on the fly), y = (s_x s_w) (q_x q_w^T) + b.

Every nn.Linear is quantized (a low-rank linear's two factors too); embeddings, norms and convolutions
stay in float32. On disk a quantized weight is two tensors, `<name>.qdata` (int8) and `<name>.scale`
(float32, one per row); reading them back quantizes the model's linears and puts the stored q and s in.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ComcatError

QUANTIZATIONS = ("int8",)
DEVICES = ("cpu", "cuda")
MIN_FEATURES = 16  # narrower linears stay in float32 (nothing to gain, and the kernels want width)


def check_quantize(quantize: str | None, device: str) -> None:
    """One line for a quantization comcat does not make, or a device torchao's int8 does not run on."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ComcatError(f"--quantize takes one of {QUANTIZATIONS}, not {quantize!r}")
    kind = torch.device(device).type if device != "auto" else "cpu"
    if kind not in DEVICES:
        raise ComcatError(f"int8 runs on {' or '.join(DEVICES)}, not {device}: pass --device cpu, or drop --quantize")


def _config():
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        raise ComcatError(f"int8 needs torchao ({e}): pip install -r requirements.txt") from None
    return quantize_, Int8DynamicActivationInt8WeightConfig()


def _wanted(module: nn.Module, fqn: str = "") -> bool:
    return type(module) is nn.Linear and min(module.in_features, module.out_features) >= MIN_FEATURES


def quantize_int8(model: nn.Module) -> nn.Module:
    """`model` with its linears int8 (module docstring), in place; model.comcat_quantized = "int8"."""
    from .lowrank import HeadLowRankAttention

    quantize_, config = _config()
    for m in model.modules():
        if isinstance(m, HeadLowRankAttention):
            m.fused = False  # its fused path concatenates raw weights, which an int8 weight cannot join
    quantize_(model, config, filter_fn=_wanted)
    model.comcat_quantized = "int8"
    return model


def is_quantized(t: torch.Tensor) -> bool:
    return type(t) is not torch.Tensor and hasattr(t, "qdata") and hasattr(t, "scale")


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every quantized weight as `<name>.qdata` (int8) and `<name>.scale` (float32)."""
    out = {}
    for k, v in model.state_dict().items():
        if is_quantized(v):
            out[f"{k}.qdata"] = v.qdata.detach().contiguous().cpu()
            out[f"{k}.scale"] = v.scale.detach().float().contiguous().cpu()
        else:
            out[k] = v.detach().contiguous().cpu()
    return out


def dequantized_state(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """int8_state read back: each qdata / scale pair as the float32 weight q s (checked shapes)."""
    out = {k: v for k, v in state.items() if not k.endswith((".qdata", ".scale"))}
    for k in [k for k in state if k.endswith(".qdata")]:
        name = k[: -len(".qdata")]
        q, s = state[k], state.get(f"{name}.scale")
        if q.dtype != torch.int8 or s is None or q.dim() != 2 or tuple(s.shape) not in ((q.shape[0], 1), (q.shape[0],)):
            raise ComcatError(f"{where}: {name} is not an int8 weight with one scale per row: re-export the model")
        out[name] = q.float() * s.float().reshape(-1, 1)
    return out


@torch.no_grad()
def load_int8(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """`model` (its float weights loaded from dequantized_state) quantized, with the stored int8 weights
    and scales put back exactly."""
    quantize_int8(model)
    for k in [k for k in state if k.endswith(".qdata")]:
        name = k[: -len(".qdata")]
        try:
            w = model.get_parameter(name)
        except AttributeError:
            raise ComcatError(f"{where}: {name} is not a weight of this model: re-export the model") from None
        if not is_quantized(w) or w.qdata.shape != state[k].shape:
            raise ComcatError(f"{where}: {name} does not match the model's int8 linears: re-export the model")
        w.qdata.copy_(state[k])
        w.scale.copy_(state[f"{name}.scale"].reshape(w.scale.shape))
    return model
