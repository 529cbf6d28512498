"""The data-aware recipe on text encoders and backbones: statistics and block distillation with the
padding masked, embedding-error allocation, and a plan that names every phase (issue 31)."""

import re

import pytest
import torch
import transformers as T
from test_transformers_models import _save, bert_with_tokenizer, sentences

from comcat.compression.allocate import calibrated_ranks
from comcat.compression.calibrate import build, calibrate
from comcat.compression.cost import Budget
from comcat.compression.job import JobSpec, run_job
from comcat.compression.load import load_model
from comcat.compression.reconstruct import DistillConfig, distill_blocks
from comcat.compression.texts import SENTENCE_VIEWS, SentenceViews, sentence_splits, sentence_views
from conftest import png_folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    folder = bert_with_tokenizer(root / "bert")
    return folder, sentences(root / "s.txt", 120)


def _ids(bert) -> torch.Tensor:
    folder, text = bert
    model = load_model(str(folder)).model
    return model, sentence_splits(text, model).fit.tensors[0]


def _sums(cal):
    """Per block the unnormalized statistics: token count and the second-moment sums."""
    return [
        (b.attn.inputs.n, b.attn.inputs.outer, b.attn.keys, b.attn.mixed.outer, b.mlp["fc1"].outer, b.mlp["fc2"].outer)
        for b in cal.stats
    ]


def test_masked_statistics_equal_those_of_the_unpadded_sentences_one_by_one(bert):
    model, ids = _ids(bert)
    model = model.double()
    assert (ids == 0).any(), "the sentences must be padded for this test to mean anything"
    padded = _sums(calibrate(model, [(ids, None)], mlp=True))
    one_by_one = None
    for row in ids[:12]:
        short = row[: int((row != 0).sum())][None]
        # calibrate needs 8 inputs: the sentence 8 times, every sum 8 times its own
        sums = _sums(calibrate(model, [(short.expand(8, -1), None)], mlp=True))
        one_by_one = sums if one_by_one is None else [[a + b for a, b in zip(x, y)] for x, y in zip(one_by_one, sums)]
    first = _sums(calibrate(model, [(ids[:12].repeat(8, 1), None)], mlp=True))
    for got, want in zip(first, one_by_one):
        assert got[0] == want[0] and got[0] == 8 * int((ids[:12] != 0).sum())
        for g, w in zip(got[1:], want[1:]):
            assert (g - w).abs().max() <= 1e-10 * w.abs().max()
    assert padded[0][0] == int((ids != 0).sum())  # no padded token counted


@pytest.mark.parametrize("pooling", [None, "mean"])  # the class token read, or the mean of the valid tokens
def test_block_distillation_loss_is_the_same_padded_or_not_on_equal_length_sentences(bert, pooling):
    model, ids = _ids(bert)
    model.pooling = pooling
    lengths = (ids != 0).sum(1)
    L = int(lengths.mode().values)
    same = ids[lengths == L][:16, :L]
    assert len(same) >= 8
    same = torch.cat([same, torch.zeros(len(same), 9, dtype=same.dtype)], 1)  # 9 padded tokens each
    cal = calibrate(model, [(same, None)], probe=8, fisher=8)
    cfg, _ = calibrated_ranks(model, cal, Budget(0.4, "params", "head", False, "attention"))
    losses = []
    for x in (same, same[:, :L]):  # padded to the model's length, and cut to the sentences' own
        small = build(model, cfg, cal)
        res = distill_blocks(small, model, [(x, torch.zeros(len(x)))], DistillConfig(steps=3, batch_size=8))
        losses.append(torch.tensor([e["loss"] for e in res["history"]]))
    assert losses[0].shape == (3 * 2,)
    assert (losses[0] - losses[1]).abs().max() <= 1e-5 * losses[1].abs().max()


def test_a_mean_pooled_encoder_distils_its_mean_token_more_with_the_read_weight(bert):
    model, ids = _ids(bert)
    model.pooling = "mean"  # as a sentence-transformers folder says (families.read_tokens: [])
    cal = calibrate(model, [(ids, None)], probe=8, fisher=8)
    cfg, _ = calibrated_ranks(model, cal, Budget(0.4, "params", "head", False, "attention"))
    with torch.no_grad():
        want = model(ids)

    def pooled_error(w):
        torch.manual_seed(0)
        small = build(model, cfg, cal)
        small = distill_blocks(small, model, [(ids, torch.zeros(len(ids)))], DistillConfig(steps=30, cls_weight=w))
        with torch.no_grad():
            return (small["model"](ids) - want).pow(2).mean().item()

    assert pooled_error(4.0) < pooled_error(0.0)


def test_a_text_encoder_gets_the_calibrated_recipe_and_the_report_names_every_phase(bert, tmp_path):
    """The default run on sentences calibrates, allocates and distills (padding masked); it ends
    closer to the dense embeddings on held-out sentences than SVD ranks, and the report and the
    run's first event say which phases ran and why the others did not."""
    folder, text = bert
    common = dict(model=str(folder), data=str(text), ratio=0.5, scope="attention", latency=False)
    events = []
    default = run_job(JobSpec(**common), tmp_path / "default", callback=events.append)["report"]
    plain = run_job(JobSpec(**common, calibration="none", distill=DistillConfig(steps=0)), tmp_path / "svd")["report"]
    assert events[0]["kind"] == "data" or events[0]["kind"] == "phase"
    plan = next(e for e in events if e["kind"] == "plan")["phases"]
    runs = {p["phase"]: p["runs"] for p in plan}
    assert runs == {
        "calibration": True,
        "allocation": True,
        "search": False,
        "distillation": True,
        "fine-tuning": False,
    }
    how = next(p["how"] for p in plan if p["phase"] == "distillation")
    assert "300 steps per block, padding masked" in how and "shuffled or spliced" in how, how  # 100 x (1 + 2)
    spec = JobSpec(**common).resolved("bert", text=True)
    assert (spec.distill.steps, spec.distill.views) == (300, 0) and spec.resolved("bert", text=True) == spec
    assert default["compressed"]["cosine"] > plain["compressed"]["cosine"] + 0.02, (default, plain)
    assert "inputs on the training sentences (data calibration)" in (tmp_path / "default" / "report.md").read_text()
    md = (tmp_path / "svd" / "report.md").read_text()
    assert "calibration: skipped (--calibration none: plain SVD of the weights)" in md
    assert "distillation: skipped (--distill-steps 0)" in md
    assert "search: skipped (not asked for (--search))" in md


def test_sentence_views_make_new_sentences_of_the_same_tokens():
    """Pass 1 shuffles each sentence's inner tokens, pass 2 joins a prefix of one sentence with a
    suffix of another; [CLS]/[SEP] stay in place, padding at the end; a seed repeats the views."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (12, 9, 3, 12, 7, 2):
        inner = torch.randint(1000, 2000, (n - 2,), generator=g) if n > 2 else torch.zeros(0, dtype=torch.long)
        rows.append(torch.cat([torch.tensor([101]), inner, torch.tensor([102]), torch.zeros(12 - n, dtype=torch.long)]))
    ids = torch.stack(rows)
    loader = [(ids, torch.zeros(len(ids)))]
    views = [x for x, _ in SentenceViews(loader, pad=0, views=2, seed=3)]
    assert len(views) == 3 and torch.equal(views[0], ids)
    assert all(torch.equal(a, b) for a, b in zip(views, [x for x, _ in SentenceViews(loader, pad=0, views=2, seed=3)]))
    inners = [row[1 : int((row != 0).sum()) - 1].tolist() for row in ids]
    for view, splice in ((views[1], False), (views[2], True)):
        assert view.shape == ids.shape and not torch.equal(view, ids)
        for i, row in enumerate(view):
            n = int((row != 0).sum())
            assert (row[n:] == 0).all() and row[0] == 101 and row[n - 1] == 102
            body = row[1 : n - 1].tolist()
            if not splice:
                assert sorted(body) == sorted(inners[i])
            elif len(inners[i]):  # a non-empty prefix of its own, then a run of another sentence (cut at 12)
                k = next(k for k in range(len(body), 0, -1) if body[:k] == inners[i][:k])
                rest = body[k:]
                assert any(rest == b[j : j + len(rest)] for b in inners for j in range(len(b) - len(rest) + 1))


def test_sentence_views_stop_at_the_memory_budget():
    assert sentence_views(480, 40, 384) == SENTENCE_VIEWS  # about 90 MB a pass
    assert sentence_views(480, 256, 384) == 2  # 566 MB a pass: 3 passes fit in 2 GiB
    assert sentence_views(2000, 512, 1024) == 0  # one pass is over the budget: the sentences alone


def test_a_backbone_without_classifier_is_allocated_and_fine_tuned_on_its_embeddings(tmp_path):
    """A DINOv2-style backbone (random init): calibrated allocation by the embedding error, then
    end-to-end distillation of the pooled embeddings brings it closer to the dense one."""
    from comcat.compression.distill import FinetuneConfig

    folder = _save(tmp_path, "Dinov2Model")
    model = T.Dinov2Model.from_pretrained(folder)
    with torch.no_grad():  # weights that make the embedding depend on the image: a harder target
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    model.save_pretrained(folder)
    data = png_folder(tmp_path / "photos", 120, 3)
    common = dict(model=str(folder), data=str(data), ratio=0.2, scope="attention", latency=False)
    common.update(distill=DistillConfig(steps=0))
    calibrated = run_job(JobSpec(**common), tmp_path / "cal")["report"]
    tuned = run_job(JobSpec(**common, finetune=FinetuneConfig(epochs=4, lr=1e-3, similarity=1.0)), tmp_path / "tuned")[
        "report"
    ]
    assert calibrated["calibration"] == "data" and "cosine" in calibrated["compressed"]
    assert tuned["compressed"]["cosine"] > calibrated["compressed"]["cosine"], (calibrated, tuned)


def test_the_embedding_loss_with_the_similarity_term():
    from comcat.compression.distill import match_loss

    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, 8, generator=g)
    assert match_loss(e, e, embeddings=True, similarity=1.0).abs() < 1e-6
    other = e.clone()
    other[0] = -other[0]  # one embedding flipped: the batch's similarity matrix changes
    plain, with_sim = (match_loss(other, e, embeddings=True, similarity=w) for w in (0.0, 1.0))
    assert with_sim > plain > 0


def test_text_files_that_cannot_be_used_get_one_line(bert, tmp_path):
    from comcat import ComcatError

    folder, _ = bert
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    for path, message in ((empty, "has 0 sentence"), (binary, "is not UTF-8 text")):
        with pytest.raises(ComcatError, match=message) as err:
            run_job(JobSpec(model=str(folder), data=str(path), ratio=0.5, latency=False), tmp_path / path.stem)
        assert "\n" not in str(err.value)


def test_long_lines_are_cut_and_counted_in_the_report(bert, tmp_path):
    folder, text = bert
    long = tmp_path / "long.txt"
    long.write_text(text.read_text() + " ".join(["w1"] * 300) + "\n" + " ".join(["w2"] * 200) + "\n")
    report = run_job(
        JobSpec(model=str(folder), data=str(long), ratio=0.5, latency=False, distill=DistillConfig(steps=0)),
        tmp_path / "out",
    )["report"]
    assert "2 sentence(s) are longer than the model's 64 tokens and are cut there" in report["data"]["note"]
    assert "cut there" in (tmp_path / "out" / "report.md").read_text() or "cut there" in str(report["data"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"held out from training, \d+ sentences\)", md), md  # the data's unit, not "images"


def test_allocation_of_a_text_encoder_spends_the_budget(bert):
    model, ids = _ids(bert)
    cal = calibrate(model, [(ids, None)], probe=16, fisher=16)
    assert cal.valid is not None and cal.valid.shape == (16, ids.shape[1])
    budget = Budget(0.5, "params", "head", False, "attention")
    cfg, sites = calibrated_ranks(model, cal, budget)
    cost_fn, target = budget.target(model)
    assert cost_fn(cfg) <= target and all(s.kl >= 0 for s in sites)
    assert len({b["qk"] for b in cfg.blocks} | {b["vo"] for b in cfg.blocks}) > 1  # not one rank everywhere
