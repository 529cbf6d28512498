"""timm families beyond the plain ViT, through the architecture interface.

BEiT: its attention (query and value biases, no key bias, a relative position bias added to the
logits) becomes comcat's canonical one on loading, exactly, and the relative position bias stays as
it is in the low-rank model. EVA / rotary ViTs: the attention rotates q and k by position; it
becomes a canonical attention with the same rotation, the QK path stays dense and W^VO_h is
factorized per head. Swin: window attention with a relative position bias and shifted windows'
masks, stages of different widths; Swin V2's cosine attention keeps QK dense like a rotary one.
ConViT and LeViT are refused in one line that says what works."""

import copy
import json
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
from conftest import png_folder, rel_err, run_cli

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)


def tiny_beit(name: str = "beit_base_patch16_224", **kwargs) -> torch.nn.Module:
    """A float64 random-init timm model (BEiT, EVA) with every parameter random (their inits zero
    the biases and shrink the layer scales and the classifier, which would hide errors)."""
    model = timm.create_model(name, pretrained=False, **{**TINY, **kwargs}).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def assert_reloads_alone(loaded, small: torch.nn.Module, original, x: torch.Tensor) -> None:
    """`small` saved by comcat reloads with the same outputs after the original folder is gone."""
    compressed = loaded.__class__(small, loaded.arch, loaded.arch_kwargs, loaded.source)
    out = save_compressed(compressed, original.parent / "small")
    shutil.rmtree(original)
    with torch.no_grad():
        assert torch.equal(load_model(str(out)).model(x), small(x))


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
    assert_reloads_alone(loaded, small, tmp_path / "beit", x)


@pytest.mark.parametrize(
    "name, message",
    [
        ("convit_tiny", r"block 0 attention is GPSA, not a multi-head attention comcat factorizes \(gated positional"),
        ("levit_128", "levit_128 is not a model family comcat supports"),
        ("swinv2_cr_tiny_ns_224", r"swinv2_cr_tiny_ns_224 is not a model .* swinv2_\* \(not swinv2_cr_\*\)"),
    ],
)
def test_unsupported_timm_families_are_refused_in_one_line(name, message):
    from comcat import ComcatError
    from comcat.compression.models import check_supported

    model = timm.create_model(name, pretrained=False)
    with pytest.raises(ComcatError, match=message) as err:
        check_supported(model, name)
    assert "\n" not in str(err.value) and "beit_*" in str(err.value)


EVAS = ["eva02_tiny_patch14_224", "eva02_base_patch14_224", "vit_betwixt_patch16_rope_reg4_gap_256"]


@pytest.mark.parametrize("name", EVAS)
def test_rotary_evas_convert_exactly_and_keep_their_qk_path_dense(name):
    """eva02_tiny (fused qkv, packed SwiGLU), eva02_base (separate q, k, v; a SwiGLU MLP that
    becomes a packed one) and a rotary ViT with 4 register tokens: exact on loading and at full rank
    (head and matrix level, with the MLPs); the rotation takes part; at head level the QK rank is
    pinned at head_dim and only W^VO_h (and the MLPs) get smaller."""
    from comcat import ComcatError
    from comcat.compression.families.qk_maps import QKMapAttention
    from comcat.compression.ranks import RankConfig

    model = tiny_beit(name)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        families.prepare(model)
        assert isinstance(families.attention(model.blocks[0]), QKMapAttention)
        assert rel_err(model(x), ref) < 1e-12
        for method in ("head", "matrix"):
            small = compress(model, full_ranks(model, method, mlp=True))
            assert rel_err(small(x), ref) < 1e-10, method
        families.attention(small.blocks[1]).qk_map.embed.zero_()  # sin 0, cos 0: the rotation takes part
        assert rel_err(small(x), ref) > 1e-3
        half = uniform_ranks(model, "head", 0.5, mlp=True)
        assert [b["qk"] for b in half.blocks] == [16, 16] and [b["vo"] for b in half.blocks] == [8, 8]
        small = compress(model, half)
        assert families.attention(small.blocks[0]).qk_map is not None
        assert 1e-6 < rel_err(small(x), ref) < 1.0
    from comcat.compression.rank_rules import energy_ranks_for_budget

    floor = r"keeps 5\d% \(W\^Q and W\^K of the rotary / cosine-attention layers stay dense\): use a"
    with pytest.raises(ComcatError, match=floor):
        energy_ranks_for_budget(model, "head", 0.5)  # half the attention is W^Q, W^K
    assert energy_ranks_for_budget(model, "head", 0.5, mlp=True).blocks[0]["qk"] == 16
    bad = RankConfig("head", [{"qk": 8, "vo": 8}, {"qk": 16, "vo": 8}])
    with pytest.raises(ComcatError, match=r"block 0: a rotary or cosine attention keeps W\^Q and W\^K .*set it to 16"):
        bad.validate(model)
    assert "W^Q and W^K stay dense" in families.describe(model)


def test_a_rotary_eva_calibrates_allocates_saves_and_reloads(tmp_path):
    """A timm folder of eva02_tiny: calibration sees the rotation (the whitened factorization at full
    rank is exact), the KL-calibrated allocation spends the budget on VO and the MLPs only, the rank
    search has no QK choice, and the model reloads from comcat's folder alone."""
    from timm.models._hub import save_for_hf

    from comcat.compression.allocate import calibrated_ranks
    from comcat.compression.cost import Budget
    from comcat.compression.search import RankSearch

    model = tiny_beit("eva02_tiny_patch14_224").float()
    save_for_hf(model, str(tmp_path / "eva"), model_args=TINY, safe_serialization=True)
    loaded = load_model(str(tmp_path / "eva"))
    assert "timm EVA (eva02_tiny_patch14_224), rotary attention" in families.describe(loaded.model)
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(loaded.model(x), model(x)) < 1e-5
        cal = calibrate(loaded.model, [(x[i : i + 8], None) for i in range(0, 40, 8)], mlp=True, probe=16, fisher=16)
        exact = build(loaded.model, full_ranks(loaded.model, "head", mlp=True), cal)
        assert rel_err(exact(x), model(x)) < 1e-4
        ranks, sites = calibrated_ranks(loaded.model, cal, Budget(0.4, method="head", mlp=True))
        assert {s.key for s in sites} == {"vo", "fc1", "fc2"} and all(b["qk"] == 16 for b in ranks.blocks)
        small = build(loaded.model, ranks, cal)
    search = RankSearch(compress(loaded.model, full_ranks(loaded.model, "head", mlp=True)), lambda r: 1.0)
    assert sorted(search.choices) == ["0_fc1", "0_fc2", "0_vo", "1_fc1", "1_fc2", "1_vo"]
    assert search.chosen().blocks[0]["qk"] == 16
    assert_reloads_alone(loaded, small, tmp_path / "eva", x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qk_norm=True), "block 0 uses qk-norm"),
        (dict(scale_attn_inner=True), r"block 0 uses a norm before W\^O \(sub-LN\)"),
        (dict(rope_type="mixed"), "learns its rotary frequencies per layer"),
    ],
)
def test_evas_comcat_cannot_factorize_are_refused_in_one_line(kwargs, message):
    from comcat import ComcatError
    from comcat.compression.models import check_supported

    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **TINY, **kwargs)
    with pytest.raises(ComcatError, match=message) as err:
        check_supported(model, "eva02_tiny_patch14_224")
    assert "\n" not in str(err.value) and "vit_*_rope_*" in str(err.value)


def test_a_prepared_eva_refuses_another_image_size():
    from comcat import ComcatError

    model = tiny_beit("eva02_tiny_patch14_224", dynamic_img_size=True)
    families.prepare(model)
    with pytest.raises(ComcatError, match="prepared for 16 rotary positions and is called with 64"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))


def plain_and_tuned_kl(tmp_path, model, images: int, ratio: str) -> dict:
    """Held-out KL to the dense model of two `comcat compress` runs of `model` at `ratio` with the
    MLPs on `images` generated shapes: the calibrated ranks alone ("plain"), and a two-epoch rank
    search from them plus three fine-tuning epochs ("tuned")."""
    data = png_folder(tmp_path / "photos", images, 5)
    common = ["--model", str(model), "--data", str(data), "--params-ratio", ratio, "--mlp", "lowrank"]
    common += ["--distill-steps", "0", "--no-latency", "--workers", "0"]
    scores = {}
    for label, extra in (
        ("plain", ["--finetune-epochs", "0"]),
        ("tuned", ["--search", "--search-epochs", "2", "--finetune-epochs", "3", "--lr", "1e-4"]),
    ):
        r = run_cli("-m", "comcat", "compress", *common, *extra, "--out", str(tmp_path / label))
        assert r.returncode == 0, r.stderr[-2000:]
        scores[label] = json.loads((tmp_path / label / "comcat.json").read_text())["report"]["compressed"]["kl"]
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_search_and_fine_tuning_improve_a_timm_family_model(tmp_path, name):
    """A random EVA / BEiT teacher (its classifier x10, so its predictions are sharp) at 20% of its
    parameters with the MLPs: a rank search and three fine-tuning epochs agree better with it on
    held-out images than the calibrated ranks alone. (A random Swin is no such teacher: its pooled
    output hardly depends on the image: the trained shapes Swins below are.)"""
    from timm.models._hub import save_for_hf

    teacher = tiny_beit(name).float()
    with torch.no_grad():
        teacher.head.weight.mul_(10)
    save_for_hf(teacher, str(tmp_path / "dense"), model_args=TINY, safe_serialization=True)
    scores = plain_and_tuned_kl(tmp_path, tmp_path / "dense", 200, "0.2")
    assert scores["tuned"] < scores["plain"], scores


SWIN = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=5)


def tiny_swin() -> torch.nn.Module:
    """A float64 Swin with two stages (16 x 16 then 8 x 8 tokens, 4 x 4 windows, every second block
    shifted, widths 32 and 64, 2 and 4 heads), every parameter random."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SWIN).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def test_swin_converts_exactly_stage_by_stage():
    """Window attention with a relative position bias and the shifted windows' mask: exact on
    loading and at full rank (head and matrix level, MLPs); bias and mask take part; the interface's
    blocks (patch merging before a stage's first block) and output rebuild the forward pass; the
    analytic FLOPs count what torch's flop counter counts; spectra of layers of two widths."""
    import numpy as np

    from comcat.compression.analysis import analyze
    from comcat.compression.cost import counted_flops, model_flops
    from comcat.compression.families.timm_swin import SwinSlot

    model = tiny_swin()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        families.prepare(model)
        blocks = families.blocks(model)
        assert len(blocks) == 4 and isinstance(blocks[2].attn, SwinSlot) and blocks[1].attn_mask is not None
        assert rel_err(model(x), ref) < 1e-12
        h = model.patch_embed(x)
        for b in blocks:
            h = families.run_block(b, h)
        assert rel_err(families.output(model, h), ref) < 1e-12
        for method in ("head", "matrix"):
            small = compress(model, full_ranks(model, method, mlp=True))
            assert rel_err(small(x), ref) < 1e-10, method
        assert model_flops(model) == counted_flops(model)
        cfg = uniform_ranks(model, "head", 0.5, mlp=True)
        assert model_flops(model, cfg) == counted_flops(compress(model, cfg))
        h0, exact = model.patch_embed(x), families.blocks(small)
        h1 = families.run_block(blocks[0], h0)
        families.attention(exact[0]).logit_bias.table.zero_()  # the relative position bias takes part
        assert rel_err(families.run_block(exact[0], h0), h1) > 1e-3
        exact[1].attn_mask.zero_()  # and so does the shifted windows' mask
        assert rel_err(families.run_block(exact[1], h1), families.run_block(blocks[1], h1)) > 1e-3
    spectra = analyze(model)
    assert spectra.layer_dims().tolist() == [32, 32, 64, 64] and spectra.layer_heads().tolist() == [2, 2, 4, 4]
    assert spectra.shape_line() == "4 blocks, 2-4 heads of dim 16, widths 32-64"
    assert spectra.head["qk"].shape == (4, 4, 16) and not spectra.head["qk"][0, 2:].any()
    for i in (0, 3):  # thin-QR spectra = the direct SVD of each head's C x C product, in both stages
        hw = families.head_weights(families.attention(blocks[i]))
        for p, (x, y) in (("qk", (hw.wq, hw.wk)), ("vo", (hw.wv, hw.wo))):
            direct = torch.linalg.svdvals(x @ y.transpose(-1, -2))[..., :16].numpy()
            assert np.abs(spectra.head_spectra(p, i) - direct).max() < 1e-10 * direct.max()
    assert spectra.dense_params() == 2 * 4 * 32**2 + 2 * 4 * 64**2
    assert spectra.head_params(1.0) == 2 * 2 * (2 * 32 * 16 * 2) + 2 * 2 * (2 * 64 * 16 * 4)
    assert "timm Swin Transformer (swin_tiny_patch4_window7_224)" in families.describe(model)


def test_a_swin_calibrates_saves_and_reloads(tmp_path):
    """A timm Swin folder: the calibration statistics see the windows' masks (the whitened
    factorization at full rank is exact), the calibrated allocation runs, and the compressed model
    reloads from comcat's folder alone (blocks named through the stages)."""
    from timm.models._hub import save_for_hf

    from comcat.compression.allocate import calibrated_ranks
    from comcat.compression.cost import Budget

    model = tiny_swin().float()
    save_for_hf(model, str(tmp_path / "swin"), model_args=SWIN, safe_serialization=True)
    loaded = load_model(str(tmp_path / "swin"))
    x = torch.randn(40, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(loaded.model(x), model(x)) < 1e-5
        cal = calibrate(loaded.model, [(x[i : i + 8], None) for i in range(0, 40, 8)], mlp=True, probe=16, fisher=16)
        exact = build(loaded.model, full_ranks(loaded.model, "head", mlp=True), cal)
        assert rel_err(exact(x), model(x)) < 1e-4
        ranks, _ = calibrated_ranks(loaded.model, cal, Budget(0.4, method="head", mlp=True))
        small = build(loaded.model, ranks, cal)
    assert_reloads_alone(loaded, small, tmp_path / "swin", x)


@pytest.mark.slow
def test_a_swin_runs_the_whole_one_click_pipeline(tmp_path):
    """A Swin folder through `comcat compress` with block distillation, a rank search and
    fine-tuning: within the parameter budget, and the saved model reloads with the same outputs."""
    from timm.models._hub import save_for_hf

    from comcat.compression.cost import site_params
    from comcat.compression.ranks import RankConfig

    dense = tiny_swin().float()
    save_for_hf(dense, str(tmp_path / "dense"), model_args=SWIN, safe_serialization=True)
    data = png_folder(tmp_path / "photos", 120, 5)
    r = run_cli(
        "-m", "comcat", "compress", "--model", str(tmp_path / "dense"), "--data", str(data), "--params-ratio", "0.3",
        "--mlp", "lowrank", "--distill-steps", "5", "--search", "--search-epochs", "1", "--finetune-epochs", "1",
        "--no-latency", "--workers", "0", "--out", str(tmp_path / "small"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "small" / "comcat.json").read_text())
    loaded = load_model(str(tmp_path / "dense")).model
    ranks = RankConfig.from_dict(meta["ranks"])
    assert site_params(loaded, ranks, "head", True) <= 0.3 * site_params(loaded, None, "head", True)
    assert {"search", "distill", "finetune"} <= set(meta["report"])
    small = load_model(str(tmp_path / "small")).model
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(small(x), small(x)) and rel_err(small(x), loaded(x)) < 0.5


def test_swin_v2_converts_exactly_keeps_qk_dense_calibrates_and_reloads(tmp_path):
    """Cosine attention (a learned temperature per head), the MLP-made continuous position bias,
    query and value biases, post-norm blocks: exact on loading and at full rank; temperature and
    bias take part; the QK rank is pinned; calibrated, saved and reloaded from comcat's folder alone."""
    from timm.models._hub import save_for_hf

    from comcat.compression.families.qk_maps import CosineQK

    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **SWIN).double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    x = torch.randn(8, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        save_for_hf(copy.deepcopy(model).float(), str(tmp_path / "v2"), model_args=SWIN, safe_serialization=True)
        families.prepare(model)
        assert rel_err(model(x), ref) < 1e-12
        for method in ("head", "matrix"):
            small = compress(model, full_ranks(model, method, mlp=True))
            assert rel_err(small(x), ref) < 1e-10, method
        h0, blocks = model.patch_embed(x), families.blocks(small)
        h1 = families.run_block(families.blocks(model)[0], h0)
        attn = families.attention(blocks[0])
        assert isinstance(attn.qk_map, CosineQK)
        attn.qk_map.logit_scale.add_(0.5)  # the temperature takes part
        assert rel_err(families.run_block(blocks[0], h0), h1) > 1e-3
        attn.qk_map.logit_scale.sub_(0.5)
        attn.logit_bias.mlp[0].bias.add_(1.0)  # and so does the continuous position bias
        assert rel_err(families.run_block(blocks[0], h0), h1) > 1e-3
    assert [b["qk"] for b in uniform_ranks(model, "head", 0.5).blocks] == [16] * 4
    assert "cosine attention" in families.describe(model)
    loaded = load_model(str(tmp_path / "v2"))
    x = x.float()
    with torch.no_grad():
        cal = calibrate(loaded.model, [(x[i : i + 4], None) for i in range(0, 8, 4)], mlp=True)
        exact = build(loaded.model, full_ranks(loaded.model, "head", mlp=True), cal)
        assert rel_err(exact(x), loaded.model(x)) < 1e-4
        small = build(loaded.model, uniform_ranks(loaded.model, "head", 0.5, mlp=True), cal)
    assert_reloads_alone(loaded, small, tmp_path / "v2", x)


TEACHERS = ("shapes_swin", "shapes_swinv2")  # trained by assets/train_shapes_vit.py --family swin / swinv2


@pytest.mark.parametrize("name", TEACHERS)
def test_the_shapes_swin_teachers_load_and_classify_held_out_shapes(name):
    """The committed Swin and Swin V2 folders load through timm's layout with the shapes data
    config (32 x 32, mean = std = 0.5) and classify shapes none of them trained on."""
    from comcat.compression.evaluate import evaluate
    from comcat.core.embedded import ASSETS

    loaded = load_model(str(ASSETS / name))
    assert tuple(loaded.model.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert evaluate(loaded.model, progress=False)["top1"] > 90.0  # the embedded held-out shapes


@pytest.mark.slow
@pytest.mark.parametrize("name, ratio", zip(TEACHERS, ("0.2", "0.3")))
def test_search_and_fine_tuning_improve_a_trained_swin(tmp_path, name, ratio):
    """A trained Swin / Swin V2 teacher at 20% / 30% of its parameters with the MLPs (Swin V2 keeps
    W^Q and W^K dense, so 20% leaves it rank 1 everywhere else): a rank search from the calibrated
    allocation and three fine-tuning epochs agree better with it on held-out images than the
    calibrated allocation alone."""
    from comcat.core.embedded import ASSETS

    scores = plain_and_tuned_kl(tmp_path, ASSETS / name, 120, ratio)
    assert scores["tuned"] < scores["plain"], scores
