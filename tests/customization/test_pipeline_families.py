"""Customize, Generate and the LoRA export on tiny random-init SDXL, SD3 and Flux pipelines
(issue 32): each trains (its own conditioning and loss), saves, reloads into a fresh pipeline and
generates; the exported diffusers LoRA loads through the pipeline's own load_lora_weights."""

import pytest
import torch
from tiny_pipelines import flux, sd3, sdxl

from comcat.core.embedded import ASSETS
from comcat.core.errors import ComcatError
from comcat.customization.adapter import load_adapter, unload_adapter
from comcat.customization.customize import CustomizeSpec, customize
from comcat.customization.diffusion.denoisers import denoiser_for
from comcat.customization.lora_export import export_adapter
from comcat.customization.lora_normed import NormedFitConfig

HEARTS = ASSETS / "examples" / "heart"
MAKERS = {"sdxl": sdxl, "sd3": sd3, "flux": flux}


def _fresh(name):
    pipe = MAKERS[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe):
    gen = torch.Generator().manual_seed(0)
    return pipe("a V*", num_inference_steps=2, generator=gen, output_type="pt").images


@pytest.mark.parametrize("name", MAKERS)
def test_each_pipeline_customizes_reloads_generates_and_exports(name, tmp_path):
    pipe, events = _fresh(name), []
    spec = CustomizeSpec(images=str(HEARTS), prompt="a V*", steps=4, batch_size=2, preview_every=0, preview_steps=2)
    result = customize(spec, tmp_path / "run", pipe=pipe, callback=events.append)
    assert result["steps_done"] == 4 and all(loss == loss for loss in result["losses"])
    assert any(e["kind"] == "note" and "no new token is learned" in e["text"] for e in events)
    assert any(e["kind"] == "preview" for e in events)  # the last preview: the pipeline generated

    fresh = _fresh(name)
    base = _sample(fresh)
    load_adapter(fresh, result["adapter"])
    adapted = _sample(fresh)
    assert adapted.shape == base.shape and torch.isfinite(adapted).all()
    unload_adapter(fresh)
    assert torch.equal(_sample(fresh), base)  # unloading gives the base model back
    assert not torch.allclose(adapted, base, atol=1e-3)

    if name == "flux":  # q/k norms: the comfy layout is refused before the adapter is read, nothing written
        with pytest.raises(ComcatError, match="the comfy layout covers UNets.*--format diffusers"):
            export_adapter(fresh, tmp_path / "not-read", "comfy", tmp_path / "comfy.safetensors")
        assert not (tmp_path / "comfy.safetensors").exists()
    if name == "sd3":  # a UNet layout is refused before any fitting: the adapter is not even read
        with pytest.raises(ComcatError, match="the kohya layout covers UNets.*--format diffusers"):
            export_adapter(fresh, tmp_path / "not-read", "kohya", tmp_path / "kohya.safetensors")
        assert not (tmp_path / "kohya.safetensors").exists()
    fit = NormedFitConfig(steps=20, latent=8)  # Flux: fitted on inputs (test_lora_normed.py)
    lora = export_adapter(fresh, result["adapter"], "diffusers", tmp_path / "lora.safetensors", fit=fit)
    assert (lora["err_out"] is not None) == (name == "flux")
    assert lora["token_file"] is None  # no token was learned
    fresh.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert torch.isfinite(_sample(fresh)).all()


def test_a_pipeline_without_a_training_recipe_is_refused_in_one_line():
    class PixArtLike:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(ComcatError, match="Customize trains SD 1.x/2.x, SDXL, SD3/SD3.5 and Flux pipelines"):
        denoiser_for(PixArtLike())


def test_a_pipeline_folder_missing_a_component_is_one_line(tmp_path):
    import json
    import shutil

    from comcat.customization.diffusion.pipeline import load_pipeline

    sd3().save_pretrained(tmp_path / "sd3")
    index = tmp_path / "sd3" / "model_index.json"
    spec = json.loads(index.read_text())
    spec["text_encoder_3"] = [None, None]  # as a folder saved without its T5 says
    index.write_text(json.dumps(spec))
    shutil.rmtree(tmp_path / "sd3" / "text_encoder_3")
    with pytest.raises(ComcatError, match="could not load pipeline .*give 'embedded', a local diffusers folder"):
        load_pipeline(str(tmp_path / "sd3"))
