import copy

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from comcat.compression.convert import compress
from comcat.compression.cost import count_params, layer_flops, model_flops, model_params
from comcat.compression.lowrank import HeadLowRankAttention, LowRankLinear, MatrixLowRankAttention
from comcat.compression.rank_rules import energy_ranks, energy_ranks_for_budget, greedy_energy_ranks, uniform_ranks
from comcat.compression.ranks import RankConfig, site_limits
from conftest import rel_err, with_random_biases


def full_rank(model, method, mlp=True, classifier=True):
    blocks = []
    for b in model.blocks:
        lim = site_limits(b, method)
        blocks.append({k: v for k, v in lim.items() if mlp or k not in ("fc1", "fc2")})
    rank = min(model.head.in_features, model.head.out_features) if classifier else None
    return RankConfig(method, blocks, classifier=rank)


def arch(name):
    if name == "embedded":
        from comcat.compression.load import load_model

        return load_model("embedded").model
    return timm.create_model(name, pretrained=False)


def tokens(model):
    return torch.randn(
        2, *model.pretrained_cfg["input_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )


@pytest.mark.parametrize(
    "name", ["embedded", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_tiny_distilled_patch16_224"]
)
@pytest.mark.parametrize("method", ["head", "matrix"])
def test_full_rank_conversion_is_exact(name, method):
    model = with_random_biases(arch(name))
    x = tokens(model)
    with torch.no_grad():
        ref = model(x)
        out = compress(model, full_rank(model, method, mlp=name == "embedded", classifier=name == "embedded"))(x)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, ref) <= 1e-10  # float64 leaves far more headroom than the 1e-5 the spec asks


def test_attention_modules_replaced_and_input_untouched(embedded):
    model = embedded.model
    before = copy.deepcopy(model.state_dict())
    small = compress(model, uniform_ranks(model, "head", 0.5, mlp=True))
    assert all(isinstance(b.attn, HeadLowRankAttention) for b in small.blocks)
    assert all(isinstance(b.mlp.fc1, LowRankLinear) for b in small.blocks)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    small = compress(model, uniform_ranks(model, "matrix", 0.5))
    assert all(isinstance(b.attn, MatrixLowRankAttention) for b in small.blocks)


def test_truncation_error_equals_dropped_singular_values(embedded):
    """Eckart-Young: the rank-r head factors [A_h; a_h] B_h^T are the best approximation of each
    [W^Q_h; b^Q_h] W^K_h^T (W^QK_h with the query bias as its extra input row)."""
    from comcat.compression.families import head_weights
    from comcat.core.linalg import product_svd

    attn = embedded.model.blocks[2].attn
    r = 8
    lr = compress(embedded.model, RankConfig("head", [{"qk": r, "vo": r}] * 6)).blocks[2].attn
    hw = head_weights(attn)
    assert hw.bq is not None and hw.bq.abs().max() > 0
    x, y = torch.cat([hw.wq, hw.bq[:, None]], 1), hw.wk
    H, C = y.shape[0], y.shape[1]
    a = torch.cat([lr.q.weight.double().reshape(H, r, C), lr.q.bias.double().reshape(H, r, 1)], 2).transpose(1, 2)
    b = lr.k.weight.double().reshape(H, r, C).transpose(1, 2)
    s = product_svd(x, y)[1]
    for h in range(H):
        err = torch.linalg.matrix_norm(x[h] @ y[h].T - a[h] @ b[h].T)
        assert err.item() == pytest.approx(s[h, r:].square().sum().sqrt().item(), rel=1e-4)


@pytest.mark.parametrize("method", ["head", "matrix"])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25])
def test_params_and_flops_are_analytic(embedded, method, ratio):
    model = embedded.model
    cfg = uniform_ranks(model, method, ratio, mlp=ratio < 1)
    if ratio < 1:
        cfg.classifier = 4
    small = compress(model, cfg)
    assert model_params(model, cfg) == count_params(small)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        small(torch.randn(1, 3, 32, 32))
    assert model_flops(model, cfg) == counter.get_total_flops()


def test_dense_flops_match_counter():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    assert model_flops(model) == counter.get_total_flops()
    assert count_params(model) == model_params(model)
    assert len(layer_flops(model)) == 12


def test_rank_rules(embedded):
    model = embedded.model
    u = uniform_ranks(model, "head", 0.5)
    assert all(b == {"qk": 16, "vo": 16} for b in u.blocks)
    assert uniform_ranks(model, "matrix", 0.5).blocks[0] == {m: 32 for m in "qkvo"}
    e = energy_ranks(model, "head", 0.999)
    lo = energy_ranks(model, "head", 0.5)
    assert all(a[k] >= b[k] for a, b in zip(e.blocks, lo.blocks) for k in ("qk", "vo"))
    from comcat.compression.cost import site_params

    for method in ("head", "matrix"):
        for rule in (energy_ranks_for_budget, greedy_energy_ranks):
            for mlp in (False, True):
                cfg = rule(model, method, 0.5, mlp=mlp)
                budget = 0.5 * site_params(model, None, method, mlp)
                assert site_params(model, cfg, method, mlp) <= budget
                # and it uses the budget: one more rank step anywhere would not have been far over
                assert site_params(model, cfg, method, mlp) > 0.9 * budget
    assert RankConfig.from_dict(u.to_dict()).blocks == u.blocks


def test_lowrank_linear_full_rank_exact():
    lin = torch.nn.Linear(24, 40).double()
    x = torch.randn(5, 24, dtype=torch.float64)
    assert rel_err(LowRankLinear.from_linear(lin, 24)(x), lin(x)) < 1e-12


def test_head_attention_respects_masks():
    """A caller's boolean mask applies (the query bias is in the factors, no additive bias term)."""
    model = with_random_biases(arch("deit_tiny_patch16_224"))
    attn = model.blocks[0].attn
    lr = compress(model, full_rank(model, "head", mlp=False, classifier=False)).blocks[0].attn
    x = torch.randn(2, 10, 192, dtype=torch.float64)
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    assert rel_err(lr(x, attn_mask=mask), attn(x, attn_mask=mask)) < 1e-10


@pytest.mark.parametrize("rq,rv", [(5, 11), (11, 5)])
def test_unequal_head_ranks_are_zero_padded_exactly(embedded, rq, rv, monkeypatch):
    """r_qk != r_vo: the smaller side is padded with zero rows to one SDPA head dim; the output is
    still sum_h softmax(scale (X A_h + a_h)(X B_h)^T) (X P_h diag(c_vo)) R_h^T + b_out, with the
    search's soft masks c applied to the real rank columns only."""
    model = with_random_biases(copy.deepcopy(embedded.model))
    attn = compress(model, RankConfig("head", [{"qk": rq, "vo": rv}] * len(model.blocks))).blocks[1].attn
    H, C = attn.num_heads, attn.proj.out_features
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, C, dtype=torch.float64, generator=g)
    attn.rank_mask_qk = torch.rand(rq, dtype=torch.float64, generator=g)
    attn.rank_mask_vo = torch.rand(rv, dtype=torch.float64, generator=g)
    a, bq = attn.q.weight.view(H, rq, C), attn.q.bias.view(H, 1, rq)
    q = (torch.einsum("bnc,hrc->bhnr", x, a) + bq) * attn.rank_mask_qk
    k = torch.einsum("bnc,hrc->bhnr", x, attn.k.weight.view(H, rq, C))
    v = torch.einsum("bnc,hrc->bhnr", x, attn.v.weight.view(H, rv, C)) * attn.rank_mask_vo
    o = torch.softmax(attn.scale * q @ k.transpose(-1, -2), -1) @ v
    ref = torch.einsum("bhnr,chr->bnc", o, attn.proj.weight.view(C, H, rv)) + attn.proj.bias
    assert rel_err(attn(x), ref) < 1e-12
    monkeypatch.setattr(HeadLowRankAttention, "pad_heads", False)  # what counted_flops runs
    assert rel_err(attn(x), ref) < 1e-12


def test_inference_cache_follows_parameter_changes(embedded):
    """The fused input weights are cached at inference and rebuilt when a parameter changes in place
    or is replaced (truncate), and never used where gradients flow."""
    from comcat.compression.convert import truncate

    model = compress(embedded.model, uniform_ranks(embedded.model, "head", 0.5)).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, attn.proj.out_features)

    def fresh():
        cache, attn._cache = attn._cache, None
        with torch.no_grad():
            out = attn(x)
        attn._cache = cache
        return out

    with torch.no_grad():
        first = attn(x)
        assert attn._cache is not None and torch.equal(attn(x), first)
        attn.q.weight.mul_(1.5)  # in place: the version changes
        assert torch.equal(attn(x), fresh()) and not torch.equal(attn(x), first)
        before = attn(x)
        attn.proj.bias = torch.nn.Parameter(attn.proj.bias + 1.0)  # the output bias replaced
        assert torch.equal(attn(x), fresh()) and torch.allclose(attn(x), before + 1.0, atol=1e-6)
    out = attn(x)  # gradients flow: built fresh, part of the graph
    out.sum().backward()
    assert attn.k.weight.grad is not None and attn.k.weight.grad.abs().sum() > 0
    small = truncate(model, uniform_ranks(embedded.model, "head", 0.25))  # parameters replaced
    attn = small.blocks[0].attn
    with torch.no_grad():
        assert torch.equal(attn(x), fresh())


@pytest.mark.parametrize(
    "name", ["vit_small_patch14_dinov2", "vit_base_patch16_clip_224", "vit_base_patch16_siglip_224"]
)
@pytest.mark.parametrize("method", ["head", "matrix"])
def test_timm_dinov2_clip_and_siglip_vits_convert_exactly(name, method):
    """The timm DINOv2 (layer scale, no classifier), CLIP (pre-norm) and SigLIP (attention pooling)
    ViTs share the fused-qkv Attention: tiny random-init copies convert exactly at full rank."""
    tiny = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    model = with_random_biases(timm.create_model(name, pretrained=False, **tiny)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ranks = full_rank(model, method, mlp=True, classifier=False)
    with torch.no_grad():
        ref = model(x)
        out = compress(model, ranks)(x)
    assert rel_err(out, ref) <= 1e-10
