"""LoRA export of attention that normalizes q and k (SD3.5, Flux; issue 32): fitted on the model's
own inputs (lora_normed.py), loaded by plain diffusers, nearer the adapter than the base is, and
nearer than the closed form that ignores the norms, on inputs held out from the fit."""

import pytest
import torch
from tiny_pipelines import flux, sd3

from comcat.customization.adapter import AdapterConfig, adapter_parameters, add_adapter, save_adapter, unload_adapter
from comcat.customization.adapter.model import attention_sites
from comcat.customization.diffusion.denoisers import denoiser_for
from comcat.customization.lora_export import bake_adapter, export_adapter
from comcat.customization.lora_normed import NormedFitConfig, normed

FAST = NormedFitConfig(steps=100, latent=16)

MAKERS = {"flux": flux, "sd3.5": lambda: sd3(qk_norm="rms_norm", dual_attention_layers=(0,))}


def predict(pipe) -> torch.Tensor:
    return denoiser_for(pipe).fixed_prediction(["a cat on a table", "a photo of a cat"])


@pytest.mark.parametrize("name", MAKERS)
def test_a_qk_normed_lora_loads_in_diffusers_and_follows_the_adapter(name, tmp_path):
    pipe = MAKERS[name]()
    pipe.set_progress_bar_config(disable=True)
    config = AdapterConfig(rank=2, token="cat")
    torch.manual_seed(0)
    add_adapter(pipe, config, "a")
    for key, p in adapter_parameters(pipe, "a").items():
        if key.endswith((".B", ".R")):
            p.data.normal_(0, 0.1)
    path = save_adapter(pipe, config, tmp_path / "adapter", "a", dtype=torch.float32)
    adapted = predict(pipe)
    unload_adapter(pipe)
    base = predict(pipe)

    r = export_adapter(pipe, path, "diffusers", tmp_path / "lora.safetensors", fit=FAST)
    sites = [s for s, a in attention_sites(pipe.transformer).items() if normed(a)]
    assert r["fitted_sites"] == len(sites) > 0 and r["err_qk"] is None  # every site normalizes q and k here
    for site in sites:  # held-out inputs: the fit beats the closed form that ignores the norms
        fit = r["fits"][site]
        assert fit.err_out < 1 and fit.err_out < 0.3 * fit.err_out_closed_form, (
            site,
            fit.err_out,
            fit.err_out_closed_form,
        )
    assert torch.equal(predict(pipe), base)  # the export leaves the pipeline as it was

    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))  # diffusers' own loader
    lora = predict(pipe)
    assert (lora - adapted).norm() < 0.5 * (base - adapted).norm()
    pipe.unload_lora_weights()

    if name == "flux":  # a bake merges the same fit into the weights
        from diffusers import FluxPipeline

        bake_adapter(pipe, path, tmp_path / "baked", fit=FAST)
        baked = FluxPipeline.from_pretrained(tmp_path / "baked")
        assert (predict(baked) - adapted).norm() < 0.5 * (base - adapted).norm()


def test_a_stopped_export_reports_each_attention_and_writes_nothing(tmp_path):
    """Progress comes one event per attention and stage; a stop asked for during the q/k-normed fit
    ends it at the next site with ExportStopped, no file written and the pipeline as it was."""
    from comcat.core.loop import RunControl
    from comcat.customization.lora_normed import ExportStopped

    pipe = flux()
    pipe.set_progress_bar_config(disable=True)
    config = AdapterConfig(rank=2, token="cat")
    add_adapter(pipe, config, "a")
    path = save_adapter(pipe, config, tmp_path / "adapter", "a", dtype=torch.float32)
    unload_adapter(pipe)
    base, sites = predict(pipe), len(attention_sites(pipe.transformer))

    events = []
    r = export_adapter(
        pipe, path, "diffusers", tmp_path / "all.safetensors", fit=FAST, control=RunControl(events.append)
    )
    assert [(e["stage"], e["step"]) for e in events] == [("closed form", i) for i in range(1, sites + 1)] + [
        ("q/k-normed", i) for i in range(1, r["fitted_sites"] + 1)
    ]
    events.clear()
    normed_started = lambda: any(e["stage"] == "q/k-normed" for e in events)  # noqa: E731
    with pytest.raises(ExportStopped, match="no LoRA file was written"):
        export_adapter(
            pipe,
            path,
            "diffusers",
            tmp_path / "stopped.safetensors",
            fit=FAST,
            control=RunControl(events.append, normed_started),
        )
    assert [e["stage"] for e in events].count("q/k-normed") == 1  # stopped at the second normed site
    assert not (tmp_path / "stopped.safetensors").exists() and list(tmp_path.glob("stopped*")) == []
    assert torch.equal(predict(pipe), base)  # the fit's adapter is unloaded on the way out
