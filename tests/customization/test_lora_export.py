"""An adapter as a LoRA file (issue 32): the closed-form fit, files that plain diffusers loads (no
comcat in the process), the kohya and Comfy layouts read back by diffusers' own converters, a
baked pipeline, and one-line refusals."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from comcat.cli import main
from comcat.customization.adapter import AdapterConfig, adapter_parameters, add_adapter, save_adapter, unload_adapter
from comcat.customization.adapter.lora import fit_pair
from comcat.customization.adapter.model import add_token
from comcat.customization.diffusion.pipeline import load_pipeline
from comcat.customization.lora_export import apply_lora, bake_adapter, export_adapter
from conftest import ROOT

UNET = ROOT / "assets" / "shapes_t2i" / "unet"


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 12, 16, 16, generator=g), torch.tensor([500, 200]), torch.randn(2, 8, 64, generator=g)


def _eps(unet):
    with torch.no_grad():
        return unet(*_inputs()).sample


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A rank-2 adapter with random (trained-like) B and R and a learned token, saved in float32."""
    torch.manual_seed(0)
    pipe = load_pipeline("embedded")
    add_token(pipe, "V*")
    config = AdapterConfig(rank=2, token_embedding=True, base_model="embedded")
    add_adapter(pipe, config, "a")
    for k, p in adapter_parameters(pipe, "a").items():
        if k.endswith((".B", ".R")):
            p.data.normal_(0, 0.05)
    path = save_adapter(pipe, config, tmp_path_factory.mktemp("adapter"), "a", dtype=torch.float32)
    return path


def test_the_fit_is_exact_inside_the_heads_span_and_eckart_young_optimal_outside():
    """An update x G y^T (in the head's own span) is reproduced exactly with rank <= r updates;
    a generic one by the best rank-d product: its error is the tail of the singular values."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randn(30, 6, dtype=torch.float64)
    inside = x @ torch.randn(6, 2, dtype=torch.float64) @ torch.randn(2, 6, dtype=torch.float64) @ y.T
    for dx, dy in fit_pair(x, y, inside).values():
        assert torch.allclose((x + dx) @ (y + dy).T, x @ y.T + inside, atol=1e-9)
    dx, dy = fit_pair(x, y, inside)["x first"]
    assert torch.linalg.matrix_rank(dx) <= 2 and dy.norm() < 1e-6 * dx.norm()  # all of it through y's span
    generic = torch.randn(40, 2, dtype=torch.float64) @ torch.randn(2, 30, dtype=torch.float64)
    tail = torch.linalg.svdvals(x @ y.T + generic)[6:].norm()
    errs = {k: ((x + a) @ (y + b).T - x @ y.T - generic).norm() for k, (a, b) in fit_pair(x, y, generic).items()}
    assert errs["rank d"] == pytest.approx(float(tail), rel=1e-9)
    assert errs["rank d"] <= min(errs["x first"], errs["y first"]) + 1e-12


def test_factored_targets_give_the_dense_fit_and_its_errors():
    """t passed as its factors (a, b) (what fit_site does: no m x n matrix at real widths) gives the
    same candidates and residuals as t = a b^T passed whole; a large update of low rank is
    truncated by the randomized SVD as by the full one."""
    from comcat.customization.adapter.lora import low_rank, residual_sq

    torch.manual_seed(1)
    f64 = dict(dtype=torch.float64)
    x, y, a, b = (
        torch.randn(50, 6, **f64),
        torch.randn(35, 6, **f64),
        torch.randn(50, 3, **f64),
        torch.randn(35, 3, **f64),
    )
    dense, factored = fit_pair(x, y, a @ b.T), fit_pair(x, y, (a, b))
    for method, (dx, dy) in dense.items():
        fx, fy = factored[method]
        assert torch.allclose(dx, fx, atol=1e-9) and torch.allclose(dy, fy, atol=1e-9), method
        assert residual_sq(x, y, (a, b), dx, dy) == pytest.approx(residual_sq(x, y, a @ b.T, dx, dy), rel=1e-8)
    delta = torch.randn(300, 4, **f64) @ torch.randn(4, 200, **f64)  # rank 4, truncated to 4 (randomized path)
    up, down = low_rank(delta, 4)
    assert torch.allclose(up @ down, delta, atol=1e-8)


@pytest.fixture(scope="module")
def exported(adapter, tmp_path_factory):
    """The adapter fitted once and written in the three formats; the base, adapted and merged UNet
    outputs on fixed inputs."""
    from comcat.customization.adapter import load_adapter
    from comcat.customization.lora_export import lora_state_dict

    tmp = tmp_path_factory.mktemp("exported")
    pipe = load_pipeline("embedded")
    base = _eps(pipe.unet)
    r = export_adapter(pipe, adapter, "diffusers", tmp / "diffusers.safetensors")
    files = {"diffusers": r["file"]}
    for fmt in ("kohya", "comfy"):
        files[fmt] = str(tmp / f"{fmt}.safetensors")
        save_file(lora_state_dict(r["fits"], fmt, pipe.unet), files[fmt])
    load_adapter(pipe, adapter, name="a")
    adapted = _eps(pipe.unet)
    unload_adapter(pipe)
    apply_lora(pipe.unet, r["fits"])
    return {**r, "files": files, "base": base, "adapted": adapted, "merged": _eps(pipe.unet), "tmp": tmp}


def test_the_fitted_lora_moves_the_unet_towards_the_adapter(exported):
    """The LoRA-merged UNet is much closer to the adapted one than the base is; errors in [0, 1)."""
    e = exported
    assert (e["merged"] - e["adapted"]).norm() < 0.5 * (e["base"] - e["adapted"]).norm()
    fits = e["fits"].values()
    assert all(0 <= f.err_qk < 1 and 0 <= f.err_vo < 1 for f in fits)
    assert all(up.shape[1] == down.shape[0] <= 8 for f in fits for up, down in f.factors.values())
    assert e["rank"] == 8 and e["sites"] == 14  # heads x the adapter's rank; every self- and cross-attention


def test_plain_diffusers_loads_every_format_without_comcat(exported):
    """diffusers, kohya and comfy files, each loaded by diffusers alone in a process where comcat
    cannot be imported: the same UNet outputs as comcat's own merge of the fitted LoRA."""
    e, tmp = exported, exported["tmp"]
    assert e["token"] == "V*" and load_file(e["token_file"])["emb_params"].shape == (1, 64)
    keys = {fmt: sorted(load_file(f)) for fmt, f in e["files"].items()}
    assert any(k.startswith("unet.down_blocks.1.attentions.0.") and "lora_A" in k for k in keys["diffusers"])
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in keys["kohya"])
    # one layer per block: down_blocks.1.attentions.0 is the original UNet's input_blocks.3.1
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.") for k in keys["comfy"])
    torch.save({"inputs": _inputs(), "expected": e["merged"], "base": e["base"]}, tmp / "check.pt")
    script = f"""
import sys
sys.modules["comcat"] = None  # no comcat in this process
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
check = torch.load({str(tmp / "check.pt")!r})
for fmt, path in {json.dumps(e["files"])}.items():
    unet = UNet2DConditionModel.from_pretrained({str(UNET)!r})
    state, alphas = Loader.lora_state_dict(path, unet_config=unet.config)
    Loader.load_lora_into_unet(state, alphas, unet)
    with torch.no_grad():
        eps = unet(*check["inputs"]).sample
    moved = (check["base"] - check["expected"]).norm()
    err = (eps - check["expected"]).norm() / moved
    print(fmt, float(err), flush=True)
    assert err < 1e-4 and moved > 0, (fmt, float(err))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["diffusers", "kohya", "comfy"]


def test_a_baked_pipeline_needs_no_adapter(adapter, tmp_path):
    pipe = load_pipeline("embedded")
    bake_adapter(pipe, adapter, tmp_path / "baked")
    baked = load_pipeline(str(tmp_path / "baked"))
    assert "V*" in baked.tokenizer.get_vocab()
    assert torch.allclose(_eps(baked.unet), _eps(pipe.unet), atol=1e-5)
    assert json.loads((tmp_path / "baked" / "comcat_baked.json").read_text())["token"] == "V*"
    assert main(["export", str(adapter), "--format", "bake", "--out", str(tmp_path / "baked")]) == 2


def test_cli_export_shows_the_fit_attention_by_attention(adapter, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert main(["export", str(adapter), "--format", "diffusers", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "LoRA fit, closed form: 100%" in printed.err and "14/14" in printed.err, printed.err[-500:]
    assert f"wrote {out} (diffusers, LoRA rank 8 on 14 attentions" in printed.out and out.is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--format", "diffusers"], "needs the adapter and --out"),
        (["--format", "diffusers", "--out", "x.bin"], "ending in .safetensors"),
        (["--format", "diffusers", "--out", "exists.safetensors"], "exists: replace it with --overwrite"),
        (["--format", "kohya", "--out", "x.safetensors", "--rank", "0"], "--rank must be an integer"),
        ([], "export needs --onnx FILE for a model, or --format F --out FILE for an adapter"),
    ],
)
def test_export_refusals_are_one_line(adapter, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exists.safetensors").write_bytes(b"the user's own file")
    assert main(["export", str(adapter), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert (tmp_path / "exists.safetensors").read_bytes() == b"the user's own file"
