"""COMCAT attention adapters: exactness, injection through set_attn_processor, files."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from comcat.core.errors import ComcatError
from comcat.customization.adapter import (
    AdapterConfig,
    adapter_names,
    adapter_parameters,
    add_adapter,
    load_adapter,
    save_adapter,
    set_adapter_scale,
    unload_adapter,
)
from comcat.customization.adapter.model import attention_sites, train_token_row
from comcat.customization.diffusion.pipeline import ShapesPipeline, load_pipeline
from comcat.customization.diffusion.shapes_t2i import build_scheduler, build_text_encoder, build_tokenizer, build_unet

# tiny UNets shaped like SD 1.x (heads given, non-linear proj) and SD 2.x (head dims per block,
# linear projections, upcast attention)
SD1_LIKE = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=4,
    norm_num_groups=8,
)
SD2_LIKE = dict(SD1_LIKE, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)


def randomize(params, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def unet_io(config, seed=0):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    c = unet.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    ctx = torch.randn(2, 7, c.cross_attention_dim)
    return unet, (x, torch.tensor([3, 700]), ctx)


def tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    tok = build_tokenizer()
    return ShapesPipeline(
        unet=build_unet().eval(), scheduler=build_scheduler(), text_encoder=build_text_encoder(tok), tokenizer=tok
    )


@pytest.mark.parametrize("config", [SD1_LIKE, SD2_LIKE], ids=["sd1-like", "sd2-like"])
def test_zero_init_adapter_reproduces_base_and_trained_one_changes_it(config):
    unet, inputs = unet_io(config)
    with torch.no_grad():
        base = unet(*inputs).sample
    params = add_adapter(unet, AdapterConfig(rank=2))
    with torch.no_grad():
        same = unet(*inputs).sample
    assert torch.allclose(same, base, atol=1e-6)  # equal up to float rounding of the wider SDPA
    randomize(params)
    with torch.no_grad():
        changed = unet(*inputs).sample
    assert (changed - base).abs().max() > 1e-3
    set_adapter_scale(unet, "default", 0.0)
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, base)
    unload_adapter(unet)
    assert adapter_names(unet) == []
    with torch.no_grad():
        assert torch.allclose(unet(*inputs).sample, base, atol=1e-6)


def explicit_attention(attn, x, ctx, adapters):
    """sum_h softmax((q_h k_h^T + a q'_h k'_h^T) * scale) (v_h W^O_h + a v'_h R_h) + b_O, head by head."""
    H = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    d = q.shape[-1] // H
    w_o = attn.to_out[0].weight  # (out, H d)
    out = attn.to_out[0].bias.expand(x.shape[0], x.shape[1], -1).clone()
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2)
        values = v[..., sl] @ w_o[:, sl].T
        for m, a in adapters:
            r = slice(h * m.rank, (h + 1) * m.rank)
            logits = logits + a * (x @ m.A[:, r]) @ (ctx @ m.B[:, r]).transpose(1, 2)
            values = values + a * (ctx @ m.P[:, r]) @ m.R[r]
        out = out + torch.softmax(logits * attn.scale, -1) @ values
    return out


def adapted_site(kind, align, frozen, shared=False):
    """An attention of the embedded UNet (float64) with two random adapters (the first with a shared
    basis when `shared`), and inputs for it."""
    unet = build_unet().eval()
    add_adapter(unet, AdapterConfig(rank=2, scale=0.7, shared_basis=shared), "one")
    add_adapter(unet, AdapterConfig(rank=1, scale=-1.3), "two")
    unet.double()
    randomize(adapter_parameters(unet, "one").values(), 1)
    randomize(adapter_parameters(unet, "two").values(), 2)
    for name, p in unet.named_parameters():
        p.requires_grad_(not frozen or ".processor." in name)  # frozen: the widened-weight path
    name, attn = next((n, a) for n, a in attention_sites(unet).items() if n.endswith(kind))
    x = torch.randn(2, 9, attn.to_q.in_features, dtype=torch.double)
    ctx = x if kind == "attn1" else torch.randn(2, 5, attn.to_k.in_features, dtype=torch.double)
    attn.processor.align = align  # zero-padding the widened head dimension must stay exact
    return attn, x, ctx, [(attn.processor.adapters[n], attn.processor.scales[n]) for n in ("one", "two")]


@pytest.mark.parametrize(
    "frozen,shared", [(True, False), (False, False), (True, True)], ids=["widened", "concatenated", "shared-basis"]
)
@pytest.mark.parametrize("kind,align", [("attn1", 1), ("attn2", 1), ("attn1", 8), ("attn2", 16)])
def test_fused_processor_equals_explicit_per_head_formula(kind, align, frozen, shared):
    attn, x, ctx, adapters = adapted_site(kind, align, frozen, shared)
    with torch.no_grad():
        fused = attn(x, encoder_hidden_states=None if kind == "attn1" else ctx)
        explicit = explicit_attention(attn, x, ctx, adapters)
    assert torch.allclose(fused, explicit, atol=1e-10), (fused - explicit).abs().max()


@pytest.mark.parametrize("shared", [False, True], ids=["widened", "shared-basis"])
@pytest.mark.parametrize("kind,align", [("attn1", 1), ("attn2", 8)])
def test_widened_path_gradients_equal_explicit_formula(kind, align, shared):
    """WidenedLinear's hand-written backward (and autograd through a shared basis's fused q', k', v'):
    adapter and input gradients match autograd through the explicit formula."""
    attn, x, ctx, adapters = adapted_site(kind, align, frozen=True, shared=shared)
    params = [p for m, _ in adapters for p in m.parameters()]
    x.requires_grad_(True)
    probe = torch.randn(2, 9, attn.to_out[0].out_features, dtype=torch.double)

    def grads(fn):
        (fn() * probe).sum().backward()
        out = [p.grad.clone() for p in params] + [x.grad.clone()]
        for t in params + [x]:
            t.grad = None
        return out

    fused = grads(lambda: attn(x, encoder_hidden_states=None if kind == "attn1" else ctx))
    explicit = grads(lambda: explicit_attention(attn, x, ctx, adapters))
    for f, e in zip(fused, explicit):
        assert torch.allclose(f, e, atol=1e-10), (f - e).abs().max()
    assert all(p.grad is None for p in attn.to_q.parameters())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||"""
    return ((a.double().cpu() - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))],
)
@pytest.mark.parametrize("kind", ["attn1", "attn2"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_widened_adapter_in_float32_and_bf16_autocast_matches_float64(kind, autocast, device):
    """Forward and adapter gradients of the fused processor vs the explicit formula in float64."""
    attn, x, ctx, adapters = adapted_site(kind, 8, frozen=True)
    probe = torch.randn(2, 9, attn.to_out[0].out_features, dtype=torch.double)
    ref = explicit_attention(attn, x, ctx, adapters)
    (ref * probe).sum().backward()
    ref_grads = [p.grad.clone() for m, _ in adapters for p in (m.A, m.B, m.P, m.R)]

    low = copy.deepcopy(attn).float().to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = low(x.float().to(device), encoder_hidden_states=None if kind == "attn1" else ctx.float().to(device))
    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    (out.float() * probe.float().to(device)).sum().backward()
    tol = 2e-2 if autocast else 1e-4  # bf16 operands vs float32
    assert rel(out, ref.detach()) < tol
    grads = [
        p.grad
        for n in ("one", "two")
        for p in (
            low.processor.adapters[n].A,
            low.processor.adapters[n].B,
            low.processor.adapters[n].P,
            low.processor.adapters[n].R,
        )
    ]
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and rel(g, r) < 3 * tol


def test_adapter_sizes_are_per_head_rank_r():
    unet = build_unet()
    add_adapter(unet, AdapterConfig(rank=3, targets=("cross",)))
    shapes = {k: tuple(p.shape) for k, p in adapter_parameters(unet).items()}
    assert all(".attn2." in k for k in shapes)  # only cross-attention when asked
    attn = next(a for n, a in attention_sites(unet).items() if n.endswith("attn2"))
    some = next(k for k in shapes if k.endswith(".A"))
    assert shapes[some][1] == attn.heads * 3


def test_save_load_round_trip_and_two_adapters(tmp_path):
    pipe = tiny_pipeline()
    inputs = (torch.randn(1, 12, 16, 16), torch.tensor([500]), torch.randn(1, 16, 64))
    with torch.no_grad():
        base = pipe.unet(*inputs).sample
    add_adapter(pipe, AdapterConfig(rank=2, base_model="tiny"), "default")
    randomize(adapter_parameters(pipe).values(), 3)
    with torch.no_grad():
        trained = pipe.unet(*inputs).sample
    f32 = save_adapter(pipe, AdapterConfig(rank=2, base_model="tiny"), tmp_path / "a32", dtype=torch.float32)
    f16 = save_adapter(pipe, AdapterConfig(rank=2, base_model="tiny"), tmp_path / "a16")
    with safe_open(str(f16), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
        assert '"base_model": "tiny"' in f.metadata()["config"]
    assert f16.stat().st_size < f32.stat().st_size * 0.6
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a16", "a32", "adapter.safetensors", "adapter.safetensors"]

    fresh = tiny_pipeline()
    name = load_adapter(fresh, tmp_path / "a32")
    assert name == "a32"
    with torch.no_grad():
        assert torch.allclose(fresh.unet(*inputs).sample, trained, atol=1e-6)
    # a second adapter at once; at strength 0 it changes nothing, at 1 it changes the output
    second = load_adapter(fresh, f16, scale=0.0, name="second")
    with torch.no_grad():
        assert torch.allclose(fresh.unet(*inputs).sample, trained, atol=1e-6)
        set_adapter_scale(fresh, second, 1.0)
        both = fresh.unet(*inputs).sample
    assert (both - trained).abs().max() > 1e-3
    unload_adapter(fresh, "a32")
    with torch.no_grad():  # the fp16 copy alone is the same adapter up to fp16 rounding
        assert torch.allclose(fresh.unet(*inputs).sample, trained, atol=2e-2)
    unload_adapter(fresh)
    with torch.no_grad():
        assert torch.allclose(fresh.unet(*inputs).sample, base, atol=1e-6)


def test_pipeline_saved_to_a_folder_loads_back_with_an_adapter(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    add_adapter(pipe, AdapterConfig(rank=1))
    randomize(adapter_parameters(pipe).values(), 4, std=0.5)
    save_adapter(pipe, AdapterConfig(rank=1), tmp_path / "concept", dtype=torch.float32)
    gen = lambda p: (
        p("a red star", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    )
    expected = gen(pipe)
    loaded = load_pipeline(str(tmp_path / "pipe"))
    assert isinstance(loaded, ShapesPipeline)
    plain = gen(loaded)
    load_adapter(loaded, tmp_path / "concept")
    adapted = gen(loaded)
    assert abs(adapted.astype(int) - expected.astype(int)).max() <= 1
    assert abs(plain.astype(int) - expected.astype(int)).max() > 10


def test_learned_token_embedding_travels_with_the_adapter(tmp_path):
    pipe = tiny_pipeline()
    from comcat.customization.adapter.model import add_token

    tok_id = add_token(pipe, "<zz>", torch.full((64,), 0.25))
    add_adapter(pipe, AdapterConfig(rank=1, token="<zz>", token_embedding=True))
    save_adapter(pipe, AdapterConfig(rank=1, token="<zz>", token_embedding=True), tmp_path / "t")
    fresh = tiny_pipeline()
    assert "<zz>" not in fresh.tokenizer.get_vocab()
    load_adapter(fresh, tmp_path / "t")
    new_id = fresh.tokenizer.convert_tokens_to_ids("<zz>")
    assert new_id == tok_id
    assert torch.allclose(fresh.text_encoder.get_input_embeddings().weight[new_id], torch.full((64,), 0.25))


def test_unloading_restores_the_base_pipelines_tokenizer_and_embeddings_exactly():
    """Generate's 'without' gallery: after loading the example adapter (a new token V* with its learned
     row) and unloading it, the tokenizer and the table are the base model's and so are the images
    ."""
    from comcat.core.embedded import ASSETS
    from comcat.customization.generate import generate

    pipe = load_pipeline("embedded")
    vocab, table = dict(pipe.tokenizer.get_vocab()), pipe.text_encoder.get_input_embeddings().weight.clone()
    before = generate(pipe, "a V* in blue", seed=3, steps=3)[0]
    for _ in range(2):  # twice: the second load must not start from the first's token
        load_adapter(pipe, ASSETS / "examples" / "heart_adapter.safetensors")
        assert pipe.tokenizer.get_vocab() != vocab
        unload_adapter(pipe)
        assert pipe.tokenizer.get_vocab() == vocab
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
        assert generate(pipe, "a V* in blue", seed=3, steps=3)[0].tobytes() == before.tobytes()


def test_bad_adapter_inputs(tmp_path):
    with pytest.raises(ComcatError, match="positive integer"):
        AdapterConfig(rank=0)
    with pytest.raises(ComcatError, match="positive integer"):
        AdapterConfig(rank=-2)
    with pytest.raises(ComcatError, match="targets"):
        AdapterConfig(targets=("mlp",))
    pipe = tiny_pipeline()
    add_adapter(pipe, AdapterConfig(rank=1))
    save_adapter(pipe, AdapterConfig(rank=1, base_model="shapes"), tmp_path / "a")
    other, _ = unet_io(SD1_LIKE)
    with pytest.raises(ComcatError, match="another base model"):
        load_adapter(other, tmp_path / "a")
    assert adapter_names(other) == []
    with pytest.raises(ComcatError, match="no adapter at"):
        load_adapter(pipe, tmp_path / "missing")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ComcatError, match="not a readable safetensors"):
        load_adapter(pipe, tmp_path / "junk.safetensors")
    with pytest.raises(ComcatError, match="already loaded"):
        add_adapter(pipe, AdapterConfig(rank=1))


def test_train_token_row_trains_the_row_the_prompt_uses():
    """The embedded tokenizer lower-cases prompts; 'V*' must still be one token, and only its row learns."""
    from comcat.customization.diffusion.concept import encode_text
    from comcat.customization.diffusion.pipeline import tokenize

    pipe = tiny_pipeline()
    emb, tok_id = train_token_row(pipe, "V*")
    assert tok_id != pipe.tokenizer.unk_token_id and tok_id in tokenize(pipe.tokenizer, ["a V* in red"])[0].tolist()
    trainable = [p for p in pipe.text_encoder.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is emb
    encode_text(pipe, ["a V* in red"]).square().sum().backward()
    assert emb.grad.abs().sum(1).nonzero().flatten().tolist() == [tok_id]


def test_adapter_table_measures_each_heads_update_against_the_base():
    """The inspected ratios equal ||alpha A_h B_h^T|| / ||W^Q_h W^K_h^T|| (and the VO ones) formed
    explicitly, and the pipeline is left without the adapter."""
    from comcat.core.embedded import ASSETS
    from comcat.customization.adapter.inspect import adapter_summary, adapter_table

    pipe = load_pipeline("embedded")
    path = ASSETS / "examples" / "heart_adapter.safetensors"
    rows = adapter_table(pipe, path)
    assert adapter_names(pipe) == [] and len(rows) == len(attention_sites(pipe.unet))
    load_adapter(pipe, path, name="x")
    site = rows[0]["site"]
    attn, m = attention_sites(pipe.unet)[site], pipe.unet.attn_processors[site + ".processor"].adapters["x"]
    H, r = attn.heads, m.rank
    d = attn.to_q.out_features // H
    qk, vo = [], []
    for h in range(H):
        wq, wk, wv = (lin.weight[h * d : (h + 1) * d].double() for lin in (attn.to_q, attn.to_k, attn.to_v))
        wo = attn.to_out[0].weight[:, h * d : (h + 1) * d].double()
        a, b, p = (t[:, h * r : (h + 1) * r].double() for t in (m.A, m.B, m.P))
        qk.append(torch.linalg.norm(a @ b.T) / torch.linalg.norm(wq.T @ wk))
        vo.append(torch.linalg.norm(p @ m.R[h * r : (h + 1) * r].double()) / torch.linalg.norm(wv.T @ wo.T))
    assert abs(rows[0]["qk_change_mean"] - torch.stack(qk).mean().item()) < 1e-9
    assert abs(rows[0]["vo_change_max"] - torch.stack(vo).max().item()) < 1e-9
    assert "cross-attention changes W^QK by" in adapter_summary(rows)
