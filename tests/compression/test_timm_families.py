"""timm families beyond the plain ViT. BEiT through the architecture interface: its attention (query
and value biases, no key bias, a relative position bias added to the logits) becomes comcat's
canonical one on loading, exactly, and the relative position bias stays as it is in the low-rank
model. Swin, EVA / rotary ViTs and LeViT are refused in one line that says what works."""

import shutil

import pytest
import timm
import torch

from comcat.compression import families
from comcat.compression.calibrate import build, calibrate
from comcat.compression.convert import compress
from comcat.compression.families.base import BiasedAttention
from comcat.compression.families.timm_vit import BeitSlot
from comcat.compression.format import save_compressed
from comcat.compression.load import load_model
from comcat.compression.rank_rules import full_ranks, uniform_ranks
from conftest import rel_err

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)


def tiny_beit(name: str = "beit_base_patch16_224") -> torch.nn.Module:
    """A float64 random-init BEiT with every parameter random (its init zeroes the biases and
    shrinks the layer scales and the classifier, which would hide errors)."""
    model = timm.create_model(name, pretrained=False, **TINY).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "beitv2_base_patch16_224"])
def test_beit_converts_exactly_and_keeps_its_relative_position_bias(name):
    model = tiny_beit(name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        families.prepare(model)
        assert isinstance(model.blocks[0].attn, BeitSlot)
        assert isinstance(families.attention(model.blocks[0]), BiasedAttention)
        assert rel_err(model(x), ref) < 1e-12
        for method in ("head", "matrix"):
            small = compress(model, full_ranks(model, method, mlp=True))
            assert rel_err(small(x), ref) < 1e-10, method
            assert families.attention(small.blocks[0]).logit_bias is not None
        families.attention(small.blocks[1]).logit_bias.table.zero_()  # the bias really takes part
        assert rel_err(small(x), ref) > 1e-3


def test_beit_calibrates_saves_and_reloads(tmp_path):
    """A BEiT exported as timm does (config.json + weights) loads, calibrates (the statistics see
    the relative position bias), compresses and reloads from comcat's folder alone."""
    from timm.models._hub import save_for_hf

    model = tiny_beit().float()
    save_for_hf(model, str(tmp_path / "beit"), model_args=TINY, safe_serialization=True)
    loaded = load_model(str(tmp_path / "beit"))
    assert "timm VisionTransformer (beit_base_patch16_224)" in families.describe(loaded.model)
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(loaded.model(x), model(x)) < 1e-5
        cal = calibrate(loaded.model, [(x[i : i + 8], None) for i in range(0, 40, 8)], mlp=True)
        exact = build(loaded.model, full_ranks(loaded.model, "head", mlp=True), cal)
        assert rel_err(exact(x), model(x)) < 1e-4  # the whitened factorization at full rank
        small = build(loaded.model, uniform_ranks(loaded.model, "head", 0.5, mlp=True), cal)
    out = save_compressed(loaded.__class__(small, loaded.arch, loaded.arch_kwargs, loaded.source), tmp_path / "small")
    shutil.rmtree(tmp_path / "beit")
    with torch.no_grad():
        assert torch.equal(load_model(str(out)).model(x), small(x))


@pytest.mark.parametrize(
    "name, message",
    [
        ("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224 is not a model family comcat supports"),
        ("eva02_tiny_patch14_224", "block 0 attention is EvaAttention, not a multi-head attention comcat factorizes"),
        ("vit_betwixt_patch16_rope_reg4_gap_256", r"EvaAttention, .* \(rotary, window and pooling attentions"),
        ("levit_128", "levit_128 is not a model family comcat supports"),
    ],
)
def test_unsupported_timm_families_are_refused_in_one_line(name, message):
    from comcat import ComcatError
    from comcat.compression.models import check_supported

    model = timm.create_model(name, pretrained=False)
    with pytest.raises(ComcatError, match=message) as err:
        check_supported(model, name)
    assert "\n" not in str(err.value) and "beit_*" in str(err.value)
