"""Adapters on today's text-to-image denoisers (issue 32), on small random-init configs of the
diffusers classes: SDXL-style UNets, PixArt, Sana (cross-attention only), SD3/SD3.5 joint attention
on each stream; Flux refused in one line. Each: a fresh adapter changes nothing, trained factors
move the output and get gradients, unloading restores the model exactly, save/load round-trips."""

import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

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
    """An SDXL-style UNet: added time / text embeddings, two transformer layers in a block, linear projections."""
    m = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
        norm_num_groups=8,
        use_linear_projection=True,
    )
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


def sd3():
    """SD3.5-style: qk RMS norms, a dual-attention first block, a context-pre-only last block."""
    m = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    args = (_seeded(1, 4, 8, 8), _seeded(1, 5, 16), _seeded(1, 8), torch.tensor([10]))
    return m, lambda: m(*args).sample


FAMILIES = {
    "sdxl": (sdxl, {}, 16),
    "pixart": (pixart, {}, 2),
    "sana": (sana, {}, 1),  # its cross-attention; the linear self-attention is left alone
    "sd3 image": (sd3, {"stream": "image"}, 3),
    "sd3 context": (sd3, {"stream": "context"}, 1),  # the first block only: the last discards its context
    "sd3 both": (sd3, {"stream": "both"}, 3),
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
        assert torch.allclose(run(), base, atol=1e-5)  # B and R start at zero
    for k, p in params.items():
        if k.endswith((".B", ".R")):
            p.data.normal_(0, 0.1)
    out = run()
    assert (out - base).abs().max() > 1e-3
    out.square().mean().backward()
    assert all(p.grad is not None for k, p in params.items() if k.endswith((".A", ".B", ".R")))
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


def test_sd3_streams_put_the_update_where_they_say():
    """The image stream's adapter leaves the context stream's output of a joint block unchanged;
    the context stream's adapter leaves the image stream's unchanged."""
    torch.manual_seed(0)
    model, _ = sd3()
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


def test_flux_and_sana_self_attention_are_refused_in_one_line():
    flux = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    with pytest.raises(ComcatError, match="Flux .* takes no comcat adapter yet"):
        add_adapter(flux, AdapterConfig(rank=2))
    model, _ = sana()
    with pytest.raises(ComcatError, match="self-attention is linear .*targets: cross"):
        add_adapter(model, AdapterConfig(rank=2, targets=("self",)))
    with pytest.raises(ComcatError, match="adapter stream must be one of image, context, both"):
        AdapterConfig(stream="text")
