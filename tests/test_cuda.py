"""The CUDA paths: customization with bf16 + gradient checkpointing, search + AMP distillation and
GPU latency in the report (the adapter under CUDA autocast is in test_adapter.py). Skipped where
there is no GPU (CI); run on the GPU machine by benchmarks/device_check.sh."""

import json

import pytest
import torch
from test_cli import run_cli
from test_customize import concept_loss, spec

from comcat.cli import main as cli
from comcat.customization.adapter import load_adapter
from comcat.customization.customize import customize
from comcat.customization.diffusion.pipeline import load_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_customize_on_cuda_learns_and_the_adapter_loads_on_the_cpu(tmp_path):
    pipe = load_pipeline("embedded", device="cuda")
    result = customize(spec(steps=150), tmp_path / "run", pipe=pipe)
    assert pipe.unet.is_gradient_checkpointing and result["steps_done"] == 150
    assert all(l == l for l in result["losses"])  # no NaN under bf16
    cpu = load_pipeline("embedded")
    before = concept_loss(cpu)
    load_adapter(cpu, tmp_path / "run")
    assert concept_loss(cpu) < before
    assert (
        cli(
            [
                "generate",
                "--adapter",
                str(tmp_path / "run"),
                "--prompt",
                "a V* in blue",
                "--steps",
                "4",
                "--device",
                "cuda",
                "--out",
                str(tmp_path / "img.png"),
            ]
        )
        == 0
    )


def test_compress_search_and_amp_finetune_on_cuda_report_gpu_latency(tmp_path):
    out = tmp_path / "small"
    r = run_cli(
        "compress",
        "--method",
        "head",
        "--params-ratio",
        "0.5",
        "--search",
        "--search-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--device",
        "cuda",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "comcat.json").read_text())
    report = meta["report"]
    assert report["attn_params_ratio"] <= 0.5 + 1e-6  # the budget met
    assert report["compressed"]["top1"] > report["dense"]["top1"] - 3
    assert {"cuda_b1", "cuda_b32"} <= set(report["compressed"]["latency_ms"])


def test_adapter_training_step_replays_as_a_cuda_graph_like_eager_steps():
    """The adapter's whole training step (forward, backward, AdamW) can be captured as one CUDA graph
    (benchmarks/diffusion_customization.py --cuda-graph): 1 warm-up + 2 replayed steps = 3 eager steps."""
    from comcat.customization.adapter import AdapterConfig, add_adapter

    def trained(graph: bool) -> tuple[list[torch.Tensor], ...]:
        torch.manual_seed(0)
        unet = load_pipeline("embedded", device="cuda").unet.requires_grad_(False)
        params = add_adapter(unet, AdapterConfig(rank=2))
        for p in params:  # non-zero B and R so that every factor gets a gradient
            p.data.normal_(0, 0.1)
        start = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-2, capturable=True)
        g = torch.Generator("cuda").manual_seed(1)
        size = unet.config.sample_size
        z = torch.randn(2, unet.config.in_channels, size, size, device="cuda", generator=g)
        ctx = torch.randn(2, 8, unet.config.cross_attention_dim, device="cuda", generator=g)
        t = torch.tensor([10, 500], device="cuda")

        def step():
            torch.nn.functional.mse_loss(unet(z, t, ctx).sample, z).backward()
            opt.step()

        side = torch.cuda.Stream()  # PyTorch's recipe: warm up on a side stream, grads None at capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.zero_grad(set_to_none=True)
            step()  # step 1, eager (also creates AdamW's state)
        torch.cuda.current_stream().wait_stream(side)
        after_one = [p.detach().clone() for p in params]
        if graph:
            opt.zero_grad(set_to_none=True)
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                step()  # recorded, not run
            captured.replay()
            captured.replay()
        else:
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.synchronize()
        return start, after_one, [p.detach().clone() for p in params]

    (start, _, eager), (_, after_one, replayed) = trained(False), trained(True)
    assert any(not torch.equal(a, b) for a, b in zip(after_one, replayed))  # the replays ran
    for s0, a, b in zip(start, eager, replayed):  # the same updates, up to cuDNN's TF32 convolutions
        assert (b - a).norm() <= 1e-2 * (a - s0).norm()
