"""Customizing the embedded text-to-image model: training, stop/resume, CLI, bad inputs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors import safe_open

from comcat.cli import main as cli
from comcat.core.errors import ComcatError
from comcat.customization.customize import CustomizeSpec, customize
from comcat.customization.diffusion.concept import denoising_loss, encode_images, encode_text, read_concept, resolution
from comcat.customization.diffusion.pipeline import load_pipeline
from conftest import ROOT

HEARTS = ROOT / "assets" / "examples" / "heart"


def spec(**kw):
    return CustomizeSpec(**{**dict(images=str(HEARTS), prompt="a V*", steps=40, batch_size=4, preview_every=0), **kw})


def concept_loss(pipe, seed=123, repeats=64) -> float:
    """Mean denoising loss on the hearts with their captions at fixed t and noise."""
    pixels, captions = read_concept(HEARTS, "a V*", "V*", resolution(pipe))
    z0 = encode_images(pipe, pixels).repeat(repeats, 1, 1, 1)
    torch.manual_seed(seed)
    with torch.no_grad():
        ctx = encode_text(pipe, captions).repeat(repeats, 1, 1)
        return denoising_loss(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), z0, ctx).mean().item()


@pytest.mark.slow
def test_short_customization_lowers_the_loss_and_keeps_the_model_frozen(tmp_path):
    pipe = load_pipeline("embedded")
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before = concept_loss(pipe)
    events = []
    result = customize(spec(steps=120, preview_every=60), tmp_path / "run", pipe=pipe, callback=events.append)
    after = concept_loss(pipe)
    assert after < before, (before, after)
    assert not result["stopped"] and result["steps_done"] == 120
    assert [e["step"] for e in events if e["kind"] == "step"] == list(range(1, 121))
    previews = [e for e in events if e["kind"] == "preview"]
    assert [e["step"] for e in previews] == [60, 120] and len(previews[0]["images"]) == 4
    assert (tmp_path / "run" / "previews" / "step_00060.png").is_file()
    # the base weights did not move
    assert all(torch.equal(frozen[k], v) for k, v in pipe.unet.state_dict().items() if k in frozen)
    with safe_open(str(tmp_path / "run" / "adapter.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["config"])
        assert meta["rank"] == 2 and meta["token"] == "V*" and meta["base_model"] == "embedded"
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


@pytest.mark.slow
def test_bf16_mixed_precision_customization_lowers_the_loss(tmp_path):
    """--precision bf16 on the CPU (autocast; the adapter's widened weights built in bf16)."""
    pipe = load_pipeline("embedded")
    before = concept_loss(pipe)
    result = customize(spec(steps=30, precision="bf16"), tmp_path / "run", pipe=pipe)
    assert all(l == l for l in result["losses"])  # no NaN
    assert concept_loss(pipe) < before


def test_a_shared_basis_customization_lowers_the_loss_and_saves_its_cores(tmp_path):
    pipe = load_pipeline("embedded")
    before = concept_loss(pipe)
    customize(spec(steps=30, rank=4, shared_basis=True), tmp_path / "run", pipe=pipe)
    assert concept_loss(pipe) < before
    with safe_open(str(tmp_path / "run" / "adapter.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["shared_basis"] is True
        assert {k.rsplit(".", 1)[-1] for k in f.keys()} == {"U", "M", "V", "S", "K", "T", "token_embedding"}


def test_stop_then_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    full = customize(spec(steps=8), tmp_path / "full")
    stops = iter([False] * 3 + [True] * 100)
    part = customize(spec(steps=8), tmp_path / "part", should_stop=lambda: next(stops))
    assert part["stopped"] and part["steps_done"] == 3
    assert (tmp_path / "part" / "adapter.safetensors").is_file()
    t0 = time.time()
    resumed = customize(CustomizeSpec(), tmp_path / "part", resume=True)
    wall = time.time() - t0
    assert resumed["steps_done"] == 8 and resumed["losses"] == full["losses"]
    # the time counts both sessions: the first one's seconds plus at most this call's (0.1 s rounding)
    assert part["seconds"] > 0 and part["seconds"] <= resumed["seconds"] <= part["seconds"] + wall + 0.1, resumed
    with (
        safe_open(str(tmp_path / "full" / "adapter.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "part" / "adapter.safetensors"), "pt") as b,
    ):
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_uninterrupted_result(tmp_path):
    """kill -9 at step 7 (checkpoints every 3 steps): --resume continues from step 6 and ends where an
    uninterrupted run ends; the killed run's lock and temp files do not block it."""
    part = tmp_path / "part"
    script = (
        "import os, signal\n"
        "from comcat.customization.customize import CustomizeSpec, customize\n"
        f"spec = CustomizeSpec(images={str(HEARTS)!r}, prompt='a V*', steps=8, batch_size=4, preview_every=0, "
        "checkpoint_every=3)\n"
        "def kill(e):\n"
        "    if e['kind'] == 'step' and e['step'] == 7:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"customize(spec, {str(part)!r}, callback=kill)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env).returncode == -signal.SIGKILL
    assert json.loads((part / "customize.json").read_text())["step"] == 6
    (part / ".adapter.safetensors.x.tmp.safetensors").write_bytes(b"half")  # a save the kill cut short
    resumed = customize(CustomizeSpec(), part, resume=True)
    full = customize(spec(steps=8, checkpoint_every=3), tmp_path / "full")
    assert resumed["steps_done"] == 8 and len(resumed["losses"]) == 8
    np.testing.assert_allclose(resumed["losses"], full["losses"], rtol=1e-4, atol=1e-6)
    with (
        safe_open(str(tmp_path / "full" / "adapter.safetensors"), "pt") as a,
        safe_open(str(part / "adapter.safetensors"), "pt") as b,
    ):
        for k in a.keys():
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k), rtol=1e-3, atol=1e-4)
    names = {p.name for p in part.iterdir()}  # a finished run keeps the adapter and its record, no state
    assert names == {"adapter.safetensors", "customize.json"}, names


def test_overwrite_starts_a_run_over_in_the_same_folder(tmp_path):
    out = tmp_path / "run"
    customize(spec(steps=2), out)
    with pytest.raises(ComcatError, match="start over with --overwrite"):
        customize(spec(steps=2), out)
    (out / "mine.txt").write_text("kept")
    again = customize(spec(steps=3), out, overwrite=True)
    assert again["steps_done"] == 3 and (out / "mine.txt").read_text() == "kept"
    assert json.loads((out / "customize.json").read_text())["spec"]["steps"] == 3


def test_cli_customize_then_generate_with_a_scaled_adapter(tmp_path, capsys):
    out = tmp_path / "heart"
    assert (
        cli(
            [
                "customize",
                "--images",
                str(HEARTS),
                "--prompt",
                "a V*",
                "--steps",
                "3",
                "--rank",
                "1",
                "--preview-every",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "saved" in capsys.readouterr().out
    assert (
        cli(
            [
                "generate",
                "--adapter",
                f"{out}:0.5",
                "--prompt",
                "a V* in blue",
                "--steps",
                "4",
                "--n",
                "2",
                "--out",
                str(tmp_path / "img.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "img.png").size == (64, 32)
    assert (
        cli(["generate", "--adapter", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "b.png")]) == 2
    )
    assert "no adapter at" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_bad_customize_inputs_fail_with_one_line_and_write_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(HEARTS, corrupt)
    (corrupt / "broken.png").write_bytes(b"\x89PNG not really")
    other = tmp_path / "other"
    shutil.copytree(HEARTS, other)
    (other / "notes.pdf").write_bytes(b"%PDF")
    captioned = tmp_path / "captioned"
    shutil.copytree(HEARTS, captioned)
    (captioned / "heart_red.txt").write_text("a heart in red")
    cases = [
        (dict(images=str(empty)), "has no images"),
        (dict(images=str(tmp_path / "missing")), "does not exist"),
        (dict(images=str(corrupt)), "cannot read image"),
        (dict(images=str(other)), "not images: notes.pdf"),
        (dict(prompt="a photo of a dog"), "does not contain the concept token"),
        (dict(images=str(captioned)), "heart_red.txt .* does not contain"),
        (dict(rank=0), "positive integer"),
        (dict(precision="fp8"), "precision must be one of auto, fp32, bf16"),
        (
            dict(token="zqx", prompt="a zqx", learn_token=False, images=str(_uncaptioned(tmp_path))),
            "unknown to this pipeline's tokenizer",
        ),
        (dict(pipeline=str(tmp_path)), "not a diffusers pipeline folder"),
    ]
    for kw, match in cases:
        out = tmp_path / "out"
        with pytest.raises(ComcatError, match=match) as err:
            customize(spec(**kw), out)
        assert "\n" not in str(err.value)
        assert not out.exists(), kw
    with pytest.raises(ComcatError, match="no customize.json"):
        customize(CustomizeSpec(), tmp_path / "never", resume=True)


def test_learned_token_customization_learns_only_its_row(tmp_path):
    pipe = load_pipeline("embedded")
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    customize(
        spec(token="<heart>", prompt="a <heart>", steps=5, learn_token=True, images=str(_uncaptioned(tmp_path))),
        tmp_path / "run",
        pipe=pipe,
    )
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    new_id = pipe.tokenizer.convert_tokens_to_ids("<heart>")
    assert new_id == len(before) and after.shape[0] == len(before) + 1
    assert torch.equal(after[: len(before)], before)
    with safe_open(str(tmp_path / "run" / "adapter.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("token_embedding"), after[new_id])


def _uncaptioned(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in HEARTS.glob("*.png"):
        shutil.copy(p, folder)
    return folder
