"""Deployment without comcat: the model as an ONNX graph (torch's exporter, a dynamic batch
dimension), optionally int8 by ONNX Runtime's dynamic quantization, checked against PyTorch.

The check runs both on the same inputs and reports max |y_onnx - y_torch| / max |y_torch| (the largest
error relative to the output's scale), and both latencies measured side by side.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import ComcatError
from ..core.files import atomic_write, check_file_out
from . import families

MAX_REL_ERROR = 1e-4  # float export; the int8 graph is judged by its scores instead
TRACE_BATCH = 2  # the exporter traces at batch 2 (1 would be specialized away)


def check_onnx_out(path: Path, model_source: str, overwrite: bool) -> None:
    """Refuse an --onnx FILE that check_file_out refuses; one line each, before any work."""
    check_file_out(path, ".onnx", "--onnx", model_source, overwrite)


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    from torch.export import Dim

    try:
        torch.onnx.export(
            model.eval(),
            (x,),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamo=True,
            dynamic_shapes=({0: Dim("batch", min=1, max=4096)},),
            external_data=False,
            verbose=False,
        )
    except ComcatError:
        raise
    except Exception as e:  # the exporter's errors are long: one line, the first of its message
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ComcatError(f"torch's ONNX exporter cannot trace this model ({first}): export the dense model") from None


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _timed(fn, rounds: int = 5, iters: int = 5) -> list[float]:
    fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        out.append((time.perf_counter() - t) / iters * 1e3)
    return out


@torch.no_grad()
def compare(model: nn.Module, path: Path, inputs: torch.Tensor, batches=(1, 32)) -> dict:
    """The ONNX file against `model` on `inputs` (n, ...): max relative error, and CPU latency of both at
    each batch size (median ms over 5 alternating rounds, and the ratio onnx / torch)."""
    session = _session(path)
    name = session.get_inputs()[0].name
    model = model.eval().cpu()
    want = model(inputs.cpu())
    want = want[0] if isinstance(want, (tuple, list)) else want
    got = torch.from_numpy(session.run(None, {name: inputs.cpu().numpy()})[0])
    if got.shape != want.shape:
        raise ComcatError(f"the ONNX graph gives {tuple(got.shape)}, PyTorch {tuple(want.shape)}: report this model")
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    out = {"max_rel_error": err, "inputs": len(inputs), "latency": {}}
    for b in batches:
        x = families.example_input(model, b, tuple(inputs.shape[1:]))
        feed = {name: x.numpy()}
        t_torch, t_onnx = [], []
        for _ in range(5):  # alternate, so that a change in the machine's load hits both alike
            t_torch += _timed(lambda: model(x), rounds=1)
            t_onnx += _timed(lambda: session.run(None, feed), rounds=1)
        ratios = [o / t for o, t in zip(t_onnx, t_torch)]
        out["latency"][f"b{b}"] = {
            "torch_ms": statistics.median(t_torch),
            "onnx_ms": statistics.median(t_onnx),
            "ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
        }
    return out


def export_onnx(model: nn.Module, path: str | Path, inputs: torch.Tensor, int8: bool = False, batches=(1, 32)) -> dict:
    """Write `model` as ONNX to `path` (temp + rename), int8 by ONNX Runtime's dynamic quantization with
    `int8`; returns compare()'s figures on `inputs` and the file's size in bytes."""
    if getattr(model, "comcat_quantized", None):
        raise ComcatError("this model is int8 (torchao), which ONNX cannot hold: export its float form with --int8")
    path = Path(path)
    model = model.eval().cpu()
    with tempfile.TemporaryDirectory(prefix=".comcat-onnx-", dir=path.parent) as tmp:
        graph = Path(tmp) / "model.onnx"
        _export(model, inputs[:TRACE_BATCH].repeat_interleave(TRACE_BATCH if len(inputs) == 1 else 1, 0), graph)
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(graph), str(Path(tmp) / "int8.onnx"), weight_type=QuantType.QInt8)
            graph = Path(tmp) / "int8.onnx"
        report = compare(model, graph, inputs, batches)
        atomic_write(path, lambda f: shutil.copyfile(graph, f))
    report.update(int8=int8, bytes=path.stat().st_size, file=str(path))
    if not int8 and report["max_rel_error"] > MAX_REL_ERROR:
        raise ComcatError(
            f"the ONNX graph differs from PyTorch by {report['max_rel_error']:.1e} of the output's scale "
            f"(over {MAX_REL_ERROR:.0e}): report this model; {path} was written for inspection"
        )
    return report


def onnx_outputs(path: str | Path, x: torch.Tensor) -> np.ndarray:
    """Run an ONNX file on x with ONNX Runtime (CPU)."""
    session = _session(Path(path))
    return session.run(None, {session.get_inputs()[0].name: x.cpu().numpy()})[0]
