"""The CUDA paths: customization with bf16 + gradient checkpointing, search + AMP distillation and
GPU latency in the report (the adapter under CUDA autocast is in test_adapter.py). Skipped where
there is no GPU (CI); run on the GPU machine by benchmarks/device_check.sh."""
import json

import pytest
import torch

from comcat.adapter import load_adapter
from comcat.cli import main as cli
from comcat.customize import customize
from comcat.diffusion.pipeline import load_pipeline
from test_cli import run_cli
from test_customize import concept_loss, spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_customize_on_cuda_learns_and_the_adapter_loads_on_the_cpu(tmp_path):
    pipe = load_pipeline("embedded", device="cuda")
    result = customize(spec(steps=150), tmp_path / "run", pipe=pipe)
    assert pipe.unet.is_gradient_checkpointing and result["steps_done"] == 150
    assert all(l == l for l in result["losses"])          # no NaN under bf16
    cpu = load_pipeline("embedded")
    before = concept_loss(cpu)
    load_adapter(cpu, tmp_path / "run")
    assert concept_loss(cpu) < before
    assert cli(["generate", "--adapter", str(tmp_path / "run"), "--prompt", "a V* in blue", "--steps", "4",
                "--device", "cuda", "--out", str(tmp_path / "img.png")]) == 0


def test_compress_search_and_amp_finetune_on_cuda_report_gpu_latency(tmp_path):
    out = tmp_path / "small"
    r = run_cli("compress", "--method", "head", "--params-ratio", "0.5", "--search", "--search-epochs", "1",
                "--finetune-epochs", "1", "--device", "cuda", "--out", str(out))
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "comcat.json").read_text())
    report = meta["report"]
    assert report["attn_params_ratio"] <= 0.5 + 1e-6      # the budget met
    assert report["compressed"]["top1"] > report["dense"]["top1"] - 3
    assert {"cuda_b1", "cuda_b32"} <= set(report["compressed"]["latency_ms"])
