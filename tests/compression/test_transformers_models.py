"""Hugging Face transformers encoders through the architecture interface: tiny random-init configs
of every supported class (no network), exact at full rank under both attention implementations
transformers selects, spectra, save / reload, loading from folders and the hub cache, bad input,
and a compress run with search and fine-tuning on a transformers copy of the embedded model."""

import json
import shutil

import pytest
import torch
import transformers as T

from comcat import ComcatError
from comcat.compression import families
from comcat.compression.analysis import analyze, head_factors
from comcat.compression.calibrate import block_inputs
from comcat.compression.convert import compress
from comcat.compression.families.hf_encoders import wrap
from comcat.compression.format import save_compressed
from comcat.compression.load import load_model
from comcat.compression.models import data_config, has_classifier
from comcat.compression.rank_rules import full_ranks, uniform_ranks
from conftest import png_folder, rel_err, run_cli

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
IMAGE = dict(TINY, image_size=32, patch_size=8)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=8)
CONFIGS = {
    "ViTForImageClassification": T.ViTConfig(**IMAGE, num_labels=5),
    "ViTModel": T.ViTConfig(**IMAGE),
    "DeiTForImageClassificationWithTeacher": T.DeiTConfig(**IMAGE, num_labels=5),
    "Dinov2Model": T.Dinov2Config(**DINO),
    "Dinov2ForImageClassification": T.Dinov2Config(**DINO, num_labels=5),
    "CLIPVisionModel": T.CLIPVisionConfig(**IMAGE),
    "SiglipVisionModel": T.SiglipVisionConfig(**IMAGE),
    "BertModel": T.BertConfig(**TINY, vocab_size=100),
    "CLIPTextModel": T.CLIPTextConfig(**TINY, vocab_size=100, max_position_embeddings=16, eos_token_id=2),
}


def tiny(name: str, impl: str = "sdpa") -> torch.nn.Module:
    """A float64 random-init model of class `name` with non-trivial biases, run with `impl` attention."""
    torch.manual_seed(0)
    cfg = T.AutoConfig.for_model(**CONFIGS[name].to_dict())
    cfg._attn_implementation = impl
    model = getattr(T, name)(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model


def inputs(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if name == "BertModel":
        ids = torch.randint(1, 100, (3, 9), generator=g)
        ids[0, 6:] = 0  # padding: the attention mask is exercised
        return ids
    if name == "CLIPTextModel":  # no padding (CLIP pads with id 1): causal attention, pooled at the largest id
        return torch.randint(3, 100, (3, 9), generator=g)
    return torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)


def reference(hf: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the transformers model itself outputs: logits, else the pooled output, else the first token."""
    out = hf(input_ids=x, attention_mask=(x != 0).long()) if x.dtype == torch.long else hf(pixel_values=x)
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_encoders_are_exact_at_full_rank(name, impl):
    """Wrapping replaces each layer's attention by comcat's canonical one without changing the
    function (eager: transformers' own softmax runs in float32, so it is the looser reference), and
    head- and matrix-level factorization at full rank, MLPs included, is exact in float64."""
    hf, x = tiny(name, impl), inputs(name)
    with torch.no_grad():
        ref = reference(hf, x)
        model = wrap(hf)
        y = model(x)
        assert rel_err(y, ref) < (1e-6 if impl == "eager" else 1e-12)
        for method in ("head", "matrix"):
            small = compress(model, full_ranks(model, method, mlp=True))
            assert rel_err(small(x), y) < 1e-10, method
            assert any("LowRank" in type(m).__name__ for m in small.modules())


@pytest.mark.parametrize("name", ["DeiTForImageClassificationWithTeacher", "CLIPVisionModel", "BertModel"])
def test_the_blocks_and_output_of_the_interface_rebuild_the_forward_pass(name):
    """First block input -> run_block over the blocks -> output(model, h) equals model(x): what
    calibration, allocation and block distillation rely on (text: padded rows too, masked)."""
    model, x = wrap(tiny(name)), inputs(name)
    with torch.no_grad():
        h, valid = block_inputs(model, [(x, None)])
        assert (valid is None) == (name != "BertModel")
        if valid is not None:
            assert not valid.all() and valid.any(1).all()  # some rows padded
        for b in families.blocks(model):
            h = families.run_block(b, h, valid)
        assert rel_err(families.output(model, h, valid), model(x)) < 1e-12


@pytest.mark.parametrize("name", ["ViTForImageClassification", "BertModel"])
def test_thin_qr_spectra_equal_the_direct_svd(name):
    model = wrap(tiny(name))
    s = analyze(model)
    for i, b in enumerate(families.blocks(model)):
        for p, (x, y) in head_factors(families.attention(b)).items():
            direct = torch.linalg.svdvals(x @ y.transpose(-1, -2))[..., : s.head_dim].numpy()
            assert abs(direct - s.head[p][i]).max() < 1e-10 * direct.max()
    assert s.depth == 2 and s.num_heads == 4 and s.head_dim == 8


def _save(tmp_path, name: str, folder: str = "model"):
    """A float32 transformers model of class `name` saved with save_pretrained (+ a preprocessor config)."""
    out = tmp_path / folder
    getattr(T, name)(CONFIGS[name]).eval().save_pretrained(out)
    pre = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": {"height": 32}}
    (out / "preprocessor_config.json").write_text(json.dumps(pre))
    return out


@pytest.mark.parametrize("name", ["DeiTForImageClassificationWithTeacher", "Dinov2Model", "BertModel", "CLIPTextModel"])
def test_a_save_pretrained_folder_loads_compresses_and_reloads_without_the_original(tmp_path, name):
    folder = _save(tmp_path, name)
    loaded = load_model(str(folder))
    assert loaded.arch == f"transformers:{name}"
    assert loaded.arch_kwargs["config"]["model_type"].replace("_", "") in name.lower()
    assert has_classifier(loaded.model) == ("Classification" in name)
    if not loaded.model.text:
        assert data_config(loaded.model)["mean"] == (0.5, 0.5, 0.5) and data_config(loaded.model)["crop_pct"] == 1.0
    assert "transformers encoder" in families.describe(loaded.model)
    small = compress(loaded.model, uniform_ranks(loaded.model, "head", 0.5, mlp=True)).eval()
    out = save_compressed(loaded.__class__(small, loaded.arch, loaded.arch_kwargs, loaded.source), tmp_path / "small")
    shutil.rmtree(folder)  # the compressed model needs neither the folder nor the hub
    again = load_model(str(out))
    x = inputs(name) if loaded.model.text else inputs(name).float()
    with torch.no_grad():
        assert torch.equal(again.model(x), small(x))
    assert again.arch == loaded.arch and again.compressed


def test_a_hub_id_loads_from_the_hub_cache_offline(tmp_path):
    """org/name from the local hub cache with the network off (a subprocess, so that the cache folder
    is the one huggingface_hub reads at import); the compressed copy reloads without it."""
    snapshot = tmp_path / "hub" / "models--comcat-test--tiny-hf-vit" / "snapshots" / "0123abcd"
    _save(tmp_path, "ViTForImageClassification", "export")
    shutil.copytree(tmp_path / "export", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = run_cli("-m", "comcat", "analyze", "--model", "comcat-test/tiny-hf-vit", env=env)
    assert r.returncode == 0 and "comcat-test/tiny-hf-vit: 2 blocks, 4 heads of dim 8" in r.stdout, r.stderr


def test_bad_transformers_models_get_one_line(tmp_path):
    gpt2 = tmp_path / "gpt2"
    T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50)).save_pretrained(gpt2)
    with pytest.raises(ComcatError, match="gpt2 model, a family comcat does not support yet: use transformers ViT"):
        load_model(str(gpt2))
    empty = tmp_path / "weights-only"
    empty.mkdir()
    shutil.copy(gpt2 / "model.safetensors", empty)
    with pytest.raises(ComcatError, match="has neither comcat.json nor config.json: pass a compressed-model folder"):
        load_model(str(empty))
    folder = _save(tmp_path, "ViTForImageClassification")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ComcatError, match=r"weights lack 16 tensors that ViTForImageClassification needs"):
        load_model(str(folder))
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(ComcatError, match=r"\(tensor shapes differ from config.json\)"):
        load_model(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ComcatError, match="config.json is not valid JSON"):
        load_model(str(folder))
    swiglu = tmp_path / "swiglu"
    T.Dinov2Model(T.Dinov2Config(**DINO, use_swiglu_ffn=True)).save_pretrained(swiglu)
    with pytest.raises(ComcatError, match="uses a SwiGLU MLP"):
        load_model(str(swiglu))


@pytest.mark.slow
def test_search_and_fine_tuning_of_a_transformers_copy_of_the_embedded_model(tmp_path):
    """The embedded shapes ViT re-saved as a transformers ViT (benchmarks/timm_to_transformers.py)
    compresses like the timm original: same spectra; a low-budget run with a rank search and one
    fine-tuning epoch agrees better with the dense model on held-out images than without them."""
    from benchmarks.timm_to_transformers import convert

    dense = load_model("embedded")
    hf = convert(dense.model)
    hf.save_pretrained(tmp_path / "shapes-hf")
    loaded = load_model(str(tmp_path / "shapes-hf"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(loaded.model(x), dense.model(x)) < 1e-5
    a, b = analyze(dense.model), analyze(loaded.model)
    assert all(abs(a.head[p] - b.head[p]).max() < 1e-5 * a.head[p].max() for p in a.head)
    data = png_folder(tmp_path / "photos", 200, 5)
    common = [
        "--model",
        str(tmp_path / "shapes-hf"),
        "--data",
        str(data),
        "--params-ratio",
        "0.15",
        "--scope",
        "attention",
    ]
    common += ["--mlp", "--allocate", "uniform", "--distill-steps", "0", "--no-latency", "--workers", "0"]
    scores = {}
    for label, extra in (
        ("plain", ["--finetune-epochs", "0"]),
        ("tuned", ["--search", "--search-epochs", "1", "--finetune-epochs", "1"]),
    ):
        r = run_cli("-m", "comcat", "compress", *common, *extra, "--out", str(tmp_path / label))
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads((tmp_path / label / "comcat.json").read_text())["report"]
        scores[label] = report["compressed"]["kl"]
    assert scores["tuned"] < scores["plain"], scores


def bert_with_tokenizer(root, words: int = 60):
    """A float32 BertModel folder with its WordPiece tokenizer (vocabulary w0 ... w59; random weights)."""
    root.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(words)]
    T.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root)
    cfg = T.BertConfig(**TINY, vocab_size=len(vocab), max_position_embeddings=64)
    torch.manual_seed(0)
    model = T.BertModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(root)
    return root


def sentences(path, n: int, seed: int = 0, words: int = 60):
    g = torch.Generator().manual_seed(seed)
    lines = [
        " ".join(f"w{int(i)}" for i in torch.randint(words, (int(k),), generator=g))
        for k in torch.randint(3, 13, (n,), generator=g)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_text_encoder_compresses_by_svd_and_refuses_data_it_cannot_read(tmp_path):
    """A BERT folder: a compress run without data gives SVD ranks at the budget and a reloadable
    model; an image folder, a folder without a tokenizer and a CLIP text tower with sentences are
    refused in one line each."""
    from comcat.compression.job import JobSpec, run_job

    folder = _save(tmp_path, "BertModel")
    spec = JobSpec(model=str(folder), ratio=0.5, scope="attention", mlp=True, latency=False)
    res = run_job(spec, tmp_path / "small")
    assert res["report"]["params_ratio"] < 0.8 and load_model(str(tmp_path / "small")).compressed
    text = sentences(tmp_path / "s.txt", 20)
    cases = [
        (folder, png_folder(tmp_path / "photos", 16, 0), "is a folder, and a text encoder reads a text file"),
        (folder, text, "has no tokenizer comcat can load: save the model's tokenizer beside it"),
        (_save(tmp_path, "CLIPTextModel", "clip"), text, "pools each sentence at its end token"),
    ]
    for i, (model, data, message) in enumerate(cases):
        with pytest.raises(ComcatError, match=message) as err:
            run_job(JobSpec(model=str(model), data=str(data), ratio=0.5, latency=False), tmp_path / f"o{i}")
        assert "\n" not in str(err.value)


def test_sentences_split_disjointly_and_fine_tuning_brings_a_text_encoder_closer(tmp_path):
    """One sentence per line, tokenized by the folder's own tokenizer: seeded disjoint train,
    validation and evaluation splits; a run with a rank search and fine-tuning on the sentences ends
    with pooled embeddings closer to the dense model's on held-out sentences (cosine, and the same
    nearest sentence) than the SVD ranks alone, within the same budget."""
    from comcat.compression.distill import FinetuneConfig
    from comcat.compression.job import JobSpec, run_job
    from comcat.compression.reconstruct import DistillConfig
    from comcat.compression.search import SearchConfig
    from comcat.compression.texts import sentence_splits

    folder = bert_with_tokenizer(tmp_path / "bert")
    text = sentences(tmp_path / "s.txt", 300)
    loaded = load_model(str(folder))
    splits = sentence_splits(text, loaded.model)
    rows = {k: {tuple(r.tolist()) for r in getattr(splits, k).tensors[0]} for k in ("train", "val", "eval")}
    assert len(splits.eval) == 150 and len(splits.val) == 30 and len(splits.train) == 120 and splits.unit == "sentences"
    assert not (rows["train"] & rows["eval"]) and not (rows["val"] & rows["eval"]) and not (rows["train"] & rows["val"])
    ids = splits.eval.tensors[0]
    assert (ids[:, 0] == 2).all() and (ids != 0).sum(1).max() == ids.shape[1] < 64  # [CLS] first; padded to the longest
    assert "cut" not in splits.note
    long = tmp_path / "long.txt"
    long.write_text(text.read_text() + " ".join(["word"] * 500) + "\n")  # one sentence past the 64 tokens
    assert (
        "1 sentence(s) are longer than the model's 64 tokens and are cut there"
        in sentence_splits(long, loaded.model).note
    )
    common = dict(model=str(folder), data=str(text), ratio=0.3, scope="attention", mlp=True, latency=False)
    common.update(calibration="none", distill=DistillConfig(steps=0))  # SVD ranks: what search and fine-tuning add
    plain = run_job(JobSpec(**common), tmp_path / "plain")["report"]
    tuned = run_job(
        JobSpec(**common, search=SearchConfig(epochs=2), finetune=FinetuneConfig(epochs=5, lr=1e-3)),
        tmp_path / "tuned",
    )["report"]
    assert plain["data"]["unit"] == "sentences" and plain["calibration"] == "none"  # --calibration none below
    assert tuned["compressed"]["cosine"] > plain["compressed"]["cosine"] + 0.1, (plain, tuned)
    assert tuned["params_ratio"] <= plain["params_ratio"] + 0.05


def test_the_clip_text_tower_is_causal_and_says_why_it_takes_no_data():
    """A token's output does not depend on later tokens, in the wrapped model and at full rank; the
    interface's output (what data-driven steps use) refuses in one line, as the pooling needs the ids."""
    model, x = wrap(tiny("CLIPTextModel")), inputs("CLIPTextModel")
    later = x.clone()
    later[:, 5:] = 3  # other tokens after position 4
    with torch.no_grad():
        small = compress(model, full_ranks(model, "head", mlp=True))
        for m in (model, small):
            a, b = m.hf(input_ids=x).last_hidden_state, m.hf(input_ids=later).last_hidden_state
            assert rel_err(a[:, :5], b[:, :5]) < 1e-12 and rel_err(a[:, 5:], b[:, 5:]) > 1e-3
    with pytest.raises(ComcatError, match="pools each sentence at its end token") as err:
        families.output(model, torch.zeros(3, 9, 32, dtype=torch.float64))
    assert "\n" not in str(err.value)


def sentence_transformers_folder(root, mode: str = "mean", normalize: bool = True, sub: str = ""):
    """A sentence-transformers folder as the library saves it: modules.json, the BERT (with its
    tokenizer) at the root or in `sub`, 1_Pooling/config.json, and a Normalize module."""
    bert_with_tokenizer(root / sub) if sub else bert_with_tokenizer(root)
    modules = [{"idx": 0, "name": "0", "path": sub, "type": "sentence_transformers.models.Transformer"}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (root / "2_Normalize").mkdir()
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "1_Pooling").mkdir()
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, keys[mode]: True}))
    return root


POOLINGS = [("mean", True, ""), ("max", False, "0_Transformer"), ("cls", True, "")]


@pytest.mark.parametrize("mode, normalize, sub", POOLINGS)
def test_a_sentence_transformers_folder_pools_as_it_says(tmp_path, mode, normalize, sub):
    """The embedding is the folder's pooling (mean / max over the unpadded tokens, or the first
    token; unit length with a Normalize module) of BERT's last hidden states, not BERT's pooler; a
    compressed model keeps that pooling without the folder; an unsupported pooling gets one line."""
    folder = sentence_transformers_folder(tmp_path / "st", mode, normalize, sub)
    loaded = load_model(str(folder))
    assert f"sentence-transformers {mode} pooling" in families.describe(loaded.model)
    ids = torch.randint(5, 65, (3, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 7:] = 0  # padding
    hf = loaded.model.hf
    with torch.no_grad():
        h, m = hf(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state, (ids != 0)[..., None]
        want = {"mean": (h * m).sum(1) / m.sum(1), "max": h.masked_fill(~m, -1e9).amax(1), "cls": h[:, 0]}[mode]
        want = torch.nn.functional.normalize(want, dim=-1) if normalize else want
        assert rel_err(loaded.model(ids), want) < 1e-6
        small = compress(loaded.model, uniform_ranks(loaded.model, "head", 0.5, mlp=True)).eval()
    out = save_compressed(loaded.__class__(small, loaded.arch, loaded.arch_kwargs, loaded.source), tmp_path / "small")
    shutil.rmtree(folder)
    again = load_model(str(out))
    with torch.no_grad():
        assert torch.equal(again.model(ids), small(ids)) and again.model.pooling == mode
    assert families.read_tokens(again.model) == ([0] if mode == "cls" else [])
    weighted = sentence_transformers_folder(tmp_path / "w", "mean")
    (weighted / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(ComcatError, match="pools by pooling_mode_weightedmean_tokens: comcat follows cls, mean or max"):
        load_model(str(weighted))
