"""Adapters on today's text-to-image denoisers (issue 32), on small random-init configs of the
diffusers classes: SDXL-style UNets, PixArt, Sana (cross-attention only), SD3/SD3.5 joint attention
on each stream, Flux's double- and single-stream blocks. Each: a fresh adapter changes nothing, trained factors
move the output and get gradients, unloading restores the model exactly, save/load round-trips."""

import pytest
import torch
from diffusers import PixArtTransformer2DModel, SanaTransformer2DModel, Transformer2DModel
from tiny_pipelines import flux_transformer, sd3_transformer, sdxl_unet

from comcat.core.errors import ComcatError
from comcat.customization.adapter import (
    AdapterConfig,
    adapter_parameters,
    add_adapter,
    load_adapter,
    save_adapter,
    unload_adapter,
)
from comcat.customization.adapter.inspect import adapter_summary, adapter_table


def _seeded(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sdxl():
    m = sdxl_unet()
    cond = {"text_embeds": torch.ones(1, 16), "time_ids": torch.ones(1, 6)}
    return m, lambda: m(_seeded(1, 4, 8, 8), torch.tensor([10]), _seeded(1, 5, 32), added_cond_kwargs=cond).sample


def pixart():
    m = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        norm_type="ada_norm_single",
        use_additional_conditions=False,
    )
    kw = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return (
        m,
        lambda: (
            m(_seeded(1, 4, 8, 8), encoder_hidden_states=_seeded(1, 5, 12), timestep=torch.tensor([10]), **kw).sample
        ),
    )


def sana():
    m = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=12,
        sample_size=8,
        patch_size=1,
    )
    return (
        m,
        lambda: m(_seeded(1, 4, 8, 8), encoder_hidden_states=_seeded(1, 5, 12), timestep=torch.tensor([10])).sample,
    )


def block():
    """A bare SD-style Transformer2DModel: no `attn_processors` of its own, read attention by attention."""
    m = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4, cross_attention_dim=12
    )
    return m, lambda: m(_seeded(1, 16, 4, 4), encoder_hidden_states=_seeded(1, 5, 12)).sample


def sd3():
    """SD3.5-style: qk RMS norms, a dual-attention first block, a context-pre-only last block."""
    m = sd3_transformer(dual_attention_layers=(0,), qk_norm="rms_norm")
    args = (_seeded(1, 4, 8, 8), _seeded(1, 5, 16), _seeded(1, 8), torch.tensor([10]))
    return m, lambda: m(*args).sample


def flux():
    m = flux_transformer()
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    args = (_seeded(1, 16, 4), _seeded(1, 5, 16), _seeded(1, 8), torch.tensor([0.5]), grid.reshape(-1, 3))
    return m, lambda: m(*args, txt_ids=torch.zeros(5, 3)).sample


FAMILIES = {
    "sdxl": (sdxl, {}, 16),
    "pixart": (pixart, {}, 2),
    "sana": (sana, {}, 1),  # its cross-attention; the linear self-attention is left alone
    "sd3 image": (sd3, {"stream": "image"}, 3),
    "sd3 context": (sd3, {"stream": "context"}, 1),  # the first block only: the last discards its context
    "sd3 both": (sd3, {"stream": "both"}, 3),
    "flux": (flux, {}, 2),  # the double-stream block's image stream, the single-stream block
    "flux context": (flux, {"stream": "context"}, 1),
    "flux shared": (flux, {"shared_basis": True}, 2),
    "sdxl shared": (sdxl, {"shared_basis": True}, 16),
    "bare block": (block, {}, 2),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_an_adapter_on_each_family_is_exact_at_start_trains_and_round_trips(family, tmp_path):
    make, kw, sites = FAMILIES[family]
    torch.manual_seed(0)
    model, run = make()
    model.eval()
    with torch.no_grad():
        base = run()
    config = AdapterConfig(rank=2, **kw)
    add_adapter(model, config, "a")
    params = adapter_parameters(model, "a")
    with torch.no_grad():
        assert torch.equal(run(), base)  # B and R start at zero
    for k, p in params.items():
        if k.endswith((".B", ".R", ".V", ".T")):
            p.data.normal_(0, 0.1)
    out = run()
    assert (out - base).abs().max() > 1e-4  # (Flux's context stream reaches the image only through later blocks)
    out.square().mean().backward()
    assert all(p.grad is not None for p in params.values())
    path = save_adapter(model, config, tmp_path, "a", dtype=torch.float32)
    with torch.no_grad():
        adapted = run()
    unload_adapter(model)
    with torch.no_grad():
        assert torch.equal(run(), base)  # the model's own processors are back
    load_adapter(model, path, name="b")
    with torch.no_grad():
        assert torch.allclose(run(), adapted, atol=1e-6)
    unload_adapter(model)
    rows = adapter_table(model, path)
    assert len({r["site"] for r in rows}) == sites
    assert "W^QK" in adapter_summary(rows)


@pytest.mark.parametrize("make", [sd3, flux], ids=["sd3", "flux"])
def test_joint_streams_put_the_update_where_they_say(make):
    """The image stream's adapter leaves the context stream's output of a joint block unchanged;
    the context stream's adapter leaves the image stream's unchanged."""
    torch.manual_seed(0)
    model, _ = make()
    attn = model.transformer_blocks[0].attn
    x, c = _seeded(1, 6, 16), _seeded(1, 5, 16, seed=2)
    with torch.no_grad():
        base_x, base_c = attn(x, c)
    for stream, same in (("image", 1), ("context", 0)):
        add_adapter(model, AdapterConfig(rank=2, stream=stream), stream)
        for k, p in adapter_parameters(model, stream).items():
            if k.endswith((".B", ".R")):
                p.data.normal_(0, 0.1)
        with torch.no_grad():
            out = attn(x, c)
        assert torch.allclose(out[same], (base_x, base_c)[same], atol=1e-6)
        assert not torch.allclose(out[1 - same], (base_x, base_c)[1 - same], atol=1e-3)
        unload_adapter(model)


def test_flux_adapter_dimensions_are_position_free():
    """With the base q, k of a single-stream block zeroed, only the adapter's logits are left: the
    output is then the same under any rotary positions (the extra dimensions are not rotated)."""
    torch.manual_seed(0)
    model, _ = flux()
    attn = model.single_transformer_blocks[0].attn
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k):
            lin.weight.zero_()
            lin.bias.zero_()
    add_adapter(model, AdapterConfig(rank=2))
    for k, p in adapter_parameters(model).items():
        if k.endswith((".B", ".R")):
            p.data.normal_(0, 0.5)
    x = _seeded(1, 7, 16)
    angles = [torch.outer(torch.arange(7.0) * step, torch.ones(4)).repeat_interleave(2, -1) for step in (0.0, 1.3)]
    with torch.no_grad():
        near, far = (attn(x, image_rotary_emb=(a.cos(), a.sin())) for a in angles)
        assert torch.allclose(near, far, atol=1e-6)
        unload_adapter(model)
        add_adapter(model, AdapterConfig(rank=2))  # and the base's own positions do count when q, k are not zero
        attn.to_q.weight.normal_()
        attn.to_k.weight.normal_()
        near, far = (attn(x, image_rotary_emb=(a.cos(), a.sin())) for a in angles)
        assert not torch.allclose(near, far, atol=1e-3)


def test_sana_self_attention_and_models_without_attention_are_refused_in_one_line():
    model, _ = sana()
    with pytest.raises(ComcatError, match="self-attention is linear .*targets: cross"):
        add_adapter(model, AdapterConfig(rank=2, targets=("self",)))
    with pytest.raises(ComcatError, match="Linear has no attention comcat can adapt: .*SD3/SD3.5 and Flux"):
        add_adapter(torch.nn.Linear(2, 2), AdapterConfig(rank=2))
    with pytest.raises(ComcatError, match="adapter stream must be one of image, context, both"):
        AdapterConfig(stream="text")


def _lora_r4_params(model) -> int:
    """Trainable parameters of a peft LoRA r4 on every attention projection of `model`."""
    from peft import LoraConfig

    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    model.delete_adapters("default")
    return n


def test_a_shared_basis_is_a_per_head_adapter_the_size_of_a_lora():
    """SharedHeadLowRank computes what a HeadLowRank holding its materialized A, B, P, R computes,
    and on a many-headed Flux (12 heads) it is smaller than LoRA r4 where per-head rank 1 is not."""
    torch.manual_seed(0)
    model = flux_transformer(num_attention_heads=12).eval()
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    args = (_seeded(1, 16, 4), _seeded(1, 5, 16), _seeded(1, 8), torch.tensor([0.5]), grid.reshape(-1, 3))

    def run():
        return model(*args, txt_ids=torch.zeros(5, 3)).sample

    lora = _lora_r4_params(model)
    shared = add_adapter(model, AdapterConfig(rank=4, shared_basis=True), "s")
    for p in shared:
        p.data.add_(torch.randn_like(p) * 0.1)
    procs = {n[: -len(".processor")]: p for n, p in model.attn_processors.items()}
    factors = {
        f"{site}.{part}.{k}": getattr(m, k).detach().clone()
        for site, proc in procs.items()
        for part, m in proc.adapters["s"].named_children()
        for k in "ABPR"
    }
    with torch.no_grad():
        out_shared = run()
    unload_adapter(model)
    per_head = add_adapter(model, AdapterConfig(rank=4), "p")
    with torch.no_grad():
        for k, p in adapter_parameters(model, "p").items():
            p.copy_(factors[k])
        assert torch.allclose(run(), out_shared, atol=1e-5)
    unload_adapter(model)
    rank1 = sum(p.numel() for p in add_adapter(model, AdapterConfig(rank=1), "r1"))
    assert sum(p.numel() for p in shared) < lora < rank1
    assert (len(per_head), len(shared)) == (4 * 3, 6 * 3)  # parts: self and cross, then the single block's self


def sd3_medium():
    m = sd3_transformer()
    args = (_seeded(1, 4, 8, 8), _seeded(1, 5, 16), _seeded(1, 8), torch.tensor([10]))
    return m, lambda: m(*args).sample


@pytest.mark.parametrize(
    "make, kw",
    [(sdxl, {}), (sdxl, {"shared_basis": True}), (sd3_medium, {}), (sd3_medium, {"stream": "both"})],
    ids=["sdxl", "sdxl shared", "sd3 image", "sd3 both"],
)
def test_each_family_exports_a_lora_that_plain_diffusers_loads(make, kw):
    """The fitted LoRA (a joint attention's projections fitted at once over both streams, split back
    by stream) loads with diffusers' own load_lora_adapter exactly as comcat merges it, and brings
    the model nearer the adapter than the base is (on the image stream: with heads 8 wide, a LoRA
    cannot also carry the context stream's update here)."""
    from comcat.customization.lora_export import apply_lora, fit_lora, lora_state_dict

    torch.manual_seed(0)
    model, run = make()
    model.eval()
    with torch.no_grad():
        base = run()
    add_adapter(model, AdapterConfig(rank=1, **kw), "a")
    for k, p in adapter_parameters(model, "a").items():
        if k.endswith((".B", ".R", ".V", ".T")):
            p.data.normal_(0, 0.05)
    with torch.no_grad():
        adapted = run()
    fits = fit_lora(model, "a")
    state = lora_state_dict(fits, "diffusers", model)
    head = "unet" if make is sdxl else "transformer"
    assert all(k.startswith(f"{head}.") for k in state)
    if "stream" in kw:
        assert any(".add_q_proj.lora_A" in k for k in state) and any(".to_add_out.lora_A" in k for k in state)
    if head == "transformer":  # kohya/Comfy layouts are UNet layouts: refused, pointing at diffusers
        for fmt in ("kohya", "comfy"):
            with pytest.raises(ComcatError, match=f"the {fmt} layout covers UNets.*--format diffusers"):
                lora_state_dict(fits, fmt, model)
    unload_adapter(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        apply_lora(model, fits)
        merged = run()
    model.load_state_dict(weights)
    model.load_lora_adapter(state, prefix=head, adapter_name="lora")
    with torch.no_grad():
        lora = run()
    assert torch.allclose(lora, merged, atol=1e-5)
    if "stream" not in kw:
        assert (lora - adapted).norm() < (base - adapted).norm()


def test_lora_of_qk_normed_attention_needs_the_pipeline_in_one_line():
    """Its fit runs on the model's own inputs (lora_normed.py), which a bare transformer cannot give."""
    from comcat.customization.lora_export import fit_lora

    model, _ = flux()
    add_adapter(model, AdapterConfig(rank=1), "a")
    with pytest.raises(ComcatError, match="normalizes q and k: .*export from the whole pipeline"):
        fit_lora(model, "a")
