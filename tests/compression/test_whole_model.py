"""The whole model in one budget (attention ranks and MLP neurons), int8 on top, and ONNX export."""

import json

import pytest
import torch

from comcat.compression.allocate import calibrated_ranks
from comcat.compression.calibrate import build, calibrate
from comcat.compression.cost import Budget, count_params, model_params
from comcat.compression.format import load_compressed, save_compressed
from comcat.compression.job import JobSpec
from comcat.compression.load import load_model
from comcat.compression.rank_rules import uniform_ranks
from comcat.core.errors import ComcatError


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return load_model("embedded")


@pytest.fixture(scope="module")
def cal(dense):
    from torch.utils.data import DataLoader

    from comcat.compression.splits import shapes_dataset

    return calibrate(dense.model, DataLoader(shapes_dataset(64, 0), batch_size=32), mlp=True, probe=16, fisher=16)


@pytest.mark.parametrize("ratio", [0.7, 0.45])
def test_the_whole_model_budget_is_what_the_built_model_counts(dense, cal, ratio):
    model = dense.model
    cfg, _ = calibrated_ranks(model, cal, Budget(ratio, "params", "head", "neurons", "model"))
    small = build(model, cfg, cal)
    counted = count_params(small)
    assert counted == model_params(model, cfg)  # the cost model is the built model's parameter count
    assert counted <= ratio * count_params(model) and counted >= (ratio - 0.02) * count_params(model)
    widths = [b["neurons"] for b in cfg.blocks]
    assert all(1 <= k <= 512 for k in widths) and len(set(widths)) > 1  # MLP widths are allocated per block
    assert all(small.blocks[i].mlp.fc1.out_features == k for i, k in enumerate(widths))


def test_neuron_mlps_save_and_reload_exactly(dense, cal, tmp_path):
    from dataclasses import replace

    cfg = uniform_ranks(dense.model, "head", 0.5, mlp="neurons")
    small = build(dense.model, cfg, cal)
    save_compressed(replace(dense, model=small), tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "comcat.json").read_text())
    assert meta["ranks"]["blocks"][0]["neurons"] == 256 and meta["params"] == count_params(small)
    back = load_compressed(tmp_path / "m").model
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(back(x), small.eval()(x))


def test_a_whole_model_budget_below_one_neuron_and_rank_one_everywhere_is_one_line(dense, cal):
    model, total = dense.model, count_params(dense.model)
    floor = model_params(model, uniform_ranks(model, "head", 1e-9, mlp="neurons")) / total  # 1 neuron, rank 1
    fixed = 1 - sum(p.numel() for b in model.blocks for p in [*b.attn.parameters(), *b.mlp.parameters()]) / total
    assert fixed < floor
    with pytest.raises(ComcatError, match="below the smallest possible model"):
        calibrated_ranks(model, cal, Budget((fixed + floor) / 2, "params", "head", "neurons", "model"))
    with pytest.raises(ComcatError, match="below what stays dense"):
        calibrated_ranks(model, cal, Budget(fixed / 2, "params", "head", "neurons", "model"))
    with pytest.raises(ComcatError, match="below what stays dense.*compress the MLPs too"):
        Budget(0.3, "params", "head", False, "model").on_sites(dense.model)


def test_int8_saves_reloads_and_stays_close(dense, tmp_path):
    pytest.importorskip("torchao")
    import copy
    from dataclasses import replace

    from comcat.compression.convert import compress
    from comcat.compression.quantize import quantize_int8

    small = compress(dense.model, uniform_ranks(dense.model, "head", 0.5, mlp="neurons")).eval()
    q = quantize_int8(copy.deepcopy(small))
    save_compressed(replace(dense, model=q), tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "comcat.json").read_text())
    assert meta["quantized"] == "int8"
    back = load_compressed(tmp_path / "q").model
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(back(x), q(x), atol=1e-5)  # the reloaded int8 model is the saved one
        assert (q(x) - small(x)).abs().max() < 0.05 * small(x).abs().max()  # and int8 is close to float
    save_compressed(replace(dense, model=small), tmp_path / "f")
    ratio = (tmp_path / "q" / "model.safetensors").stat().st_size / (
        tmp_path / "f" / "model.safetensors"
    ).stat().st_size
    assert ratio < 0.45  # int8 linears; the embedded model's embeddings and norms stay float32


def test_quantize_on_a_device_it_does_not_run_on_is_one_line():
    with pytest.raises(ComcatError, match="int8 runs on cpu or cuda, not mps"):
        JobSpec(quantize="int8", device="mps")
    with pytest.raises(ComcatError, match="--quantize takes one of"):
        JobSpec(quantize="int4")


def test_onnx_export_matches_pytorch_and_reruns_in_onnxruntime(dense, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from comcat.compression.convert import compress
    from comcat.compression.export import export_onnx, onnx_outputs
    from comcat.compression.splits import shapes_dataset

    small = compress(dense.model, uniform_ranks(dense.model, "head", 0.5, mlp="neurons")).eval()
    images = torch.stack([shapes_dataset(8, 1)[i][0] for i in range(8)])
    r = export_onnx(small, tmp_path / "m.onnx", images, batches=(2,))
    assert r["max_rel_error"] <= 1e-4 and r["latency"]["b2"]["onnx_ms"] > 0
    x = torch.randn(5, 3, 32, 32)  # another batch size than the traced one: the batch dimension is dynamic
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(onnx_outputs(tmp_path / "m.onnx", x)), small(x), rtol=1e-4, atol=1e-4
        )
    before = (tmp_path / "m.onnx").read_bytes()
    q = export_onnx(small, tmp_path / "q.onnx", images, int8=True, batches=(2,))
    assert q["bytes"] < 0.6 * len(before)


def test_an_export_the_exporter_cannot_trace_is_one_line(tmp_path):
    pytest.importorskip("onnxscript")
    from comcat.compression.export import export_onnx

    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x.sum() if x.sum().item() > 0 else x  # data-dependent Python control flow

    with pytest.raises(ComcatError, match="cannot trace this model"):
        export_onnx(Branchy(), tmp_path / "b.onnx", torch.randn(2, 3, 32, 32))
    assert not (tmp_path / "b.onnx").exists()
