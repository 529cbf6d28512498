"""Data-aware factorization, rank allocation from calibrated errors, block distillation,
disjoint splits, label-free data, mixup views."""

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from comcat.compression.calibrate import Moments, build, calibrate, calibrate_sequential, whitened_linear, whitener
from comcat.compression.rank_rules import full_ranks, uniform_ranks
from comcat.core.errors import ComcatError
from conftest import png_folder, rel_err, shapes_data, with_random_biases


def _loader(n=48, seed=7, dtype=torch.float32):
    ds = shapes_data(n, seed)
    return DataLoader(TensorDataset(ds.tensors[0].to(dtype), ds.tensors[1]), batch_size=16)


@pytest.mark.parametrize("method", ["head", "matrix"])
def test_calibrated_factorization_is_exact_at_full_rank(embedded, method):
    """Whitened factors reproduce the dense model at full rank (float64, non-trivial biases)."""
    dense = with_random_biases(copy.deepcopy(embedded.model))
    cal = calibrate(dense, _loader(dtype=torch.float64), mlp=True, matrix=method == "matrix")
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = dense(x)
        assert rel_err(build(dense, full_ranks(dense, method, mlp=True), cal)(x), ref) < 1e-9
        seq = calibrate_sequential(dense, _loader(dtype=torch.float64), full_ranks(dense, method, mlp=True))
        assert rel_err(seq(x), ref) < 1e-9


def test_whitened_truncation_error_is_the_measured_output_error():
    """Eckart-Young in the data's norm: a rank-r fit's mean squared output error over the calibration
    inputs is the sum of the dropped whitened singular values squared (and the bias keeps the mean)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 24, generator=g, dtype=torch.float64) @ torch.randn(
        24, 24, generator=g, dtype=torch.float64
    ) + torch.randn(24, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(24, 16).double()
    stats = Moments(24)
    stats.add(x)
    for r in (1, 5, 12):
        down, up, b, s = whitened_linear(lin.weight, lin.bias, stats, r, ridge=0.0)
        with torch.no_grad():
            err = (lin(x) - (x @ down.T @ up.T + b)).pow(2).sum(1).mean().item()
        assert err == pytest.approx((s[r:] ** 2).sum().item(), rel=1e-8)
        plain = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
        w_plain = plain.U[:, :r] * plain.S[:r] @ plain.Vh[:r]
        with torch.no_grad():
            err_plain = (lin(x) - (x @ w_plain.T + lin.bias)).pow(2).sum(1).mean().item()
        assert err < err_plain  # the data-aware fit is the better one on the data


def test_attention_paths_error_is_the_whitened_tail():
    """One head, float64, no ridge. VO path (QK at full rank, so the attention is unchanged): the
    measured mean squared output error over the calibration tokens is the dropped whitened tail.
    QK path: the logit error sum_j x~_j dW K dW^T x~_j^T (K the attention-weighted key covariance)
    is the dropped whitened tail of the two-sided factorization."""
    from timm.layers import Attention

    from comcat.compression.calibrate import add_attention_stats, head_attention, qk_factors, vo_factors
    from comcat.compression.families import head_weights

    torch.manual_seed(0)
    attn = Attention(16, num_heads=1, qkv_bias=True).double().eval()
    x = torch.randn(6, 20, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    with torch.no_grad():
        st = add_attention_stats(None, attn, x)
        hw = head_weights(attn)
        for r in (2, 7):
            _, _, s = vo_factors(hw, st, ridge=0.0)
            small = head_attention(attn, hw.head_dim, r, st, ridge=0.0)
            err = (small(x) - attn(x)).pow(2).sum(-1).mean().item()
            assert err == pytest.approx((s[0, r:] ** 2).sum().item(), rel=1e-8)
            a, b, s = qk_factors(hw, st, ridge=0.0)
            w = torch.cat([hw.wq[0], hw.bq[0][None]]) @ hw.wk[0].T  # [W^Q; b^Q] W^K^T
            dw = w - a[0, :, :r] @ b[0, :, :r].T
            quad = torch.trace(st.inputs.second() @ dw @ st.key_covariance()[0] @ dw.T).item()
            assert quad == pytest.approx((s[0, r:] ** 2).sum().item(), rel=1e-8)


def test_singular_and_degenerate_statistics():
    """A rank-deficient covariance still factorizes (ridge, eigen fallback); all-zero or non-finite
    inputs get a one-line error."""
    x = torch.randn(50, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)  # rank 3 in 8 dims
    m = Moments(8)
    m.add(x)
    L = whitener(m.covariance())
    assert torch.isfinite(L).all() and torch.allclose(torch.tril(L), L)
    with pytest.raises(ComcatError, match="zero on every calibration image"):
        whitener(torch.zeros(4, 4, dtype=torch.float64))
    with pytest.raises(ComcatError, match="not finite"):
        whitener(torch.full((4, 4), float("nan"), dtype=torch.float64))


def test_too_few_images_for_calibration(embedded):
    with pytest.raises(ComcatError, match="at least 8 images"):
        calibrate(embedded.model, _loader(n=5))


def test_calibration_beats_plain_svd_and_allocation_uses_the_budget(embedded):
    """On held-out shapes, calibrated factors are closer to the dense model than plain SVD at the same
    ranks, and the calibrated allocation spends the budget without exceeding it."""
    from comcat.compression.allocate import calibrated_ranks, kl_to
    from comcat.compression.convert import compress
    from comcat.compression.cost import Budget, budget_target

    dense = embedded.model
    cal = calibrate(dense, _loader(n=96), probe=16, fisher=32)
    held = shapes_data(256, 11).tensors[0]
    cfg = uniform_ranks(dense, "head", 0.25)
    with torch.no_grad():
        ref = dense(held)
        plain, calibrated = kl_to(ref, compress(dense, cfg)(held)), kl_to(ref, build(dense, cfg, cal)(held))
    assert calibrated < plain
    cost_fn, target = budget_target(dense, 0.25, "params", False)
    ranks, sites = calibrated_ranks(dense, cal, Budget(0.25))
    assert cost_fn(ranks) <= target
    step = min(s.unit for s in sites)
    assert target - cost_fn(ranks) < step or all(r == 32 for b in ranks.blocks for r in b.values())
    assert all(np.all(np.diff(s.curve) <= 1e-12) or s.curve[0] >= s.curve[-1] for s in sites)
    assert {(s.block, s.key) for s in sites} == {(i, k) for i in range(6) for k in ("qk", "vo")}


def test_spend_follows_the_convex_hull():
    """Greedy on the curves' lower convex hulls: a site whose curve drops late still gets its rank."""
    from comcat.compression.allocate import Site, hull, spend

    late = np.array([9.0, 9.0, 8.9, 8.8, 0.0])  # nothing until the last step
    steady = np.array([4.0, 3.0, 2.0, 1.0, 0.0])
    assert hull(late) == [(1, 4, pytest.approx(-3.0))]
    ranks = spend([Site(0, "a", late, unit=1.0), Site(0, "b", steady, unit=1.0)], base=2.0, target=5.0)
    assert ranks == [4, 1]  # 3 steps for the late drop beat 3 steady ones


def test_block_distillation_learns_and_resumes(embedded):
    """Each block's output error on the training images falls; a stopped run resumed ends where an
    uninterrupted one does."""
    from comcat.compression.convert import compress
    from comcat.compression.reconstruct import DistillConfig, distill_blocks
    from comcat.core.loop import RunControl

    dense = embedded.model
    ranks = uniform_ranks(dense, "head", 0.25)
    loader = _loader(n=64)
    images = torch.cat([x for x, _ in loader])
    with torch.no_grad():
        ref = dense(images)
    start = compress(dense, ranks)
    cfg = DistillConfig(steps=6, cls_weight=0.0)
    whole = distill_blocks(copy.deepcopy(start), dense, loader, cfg)
    with torch.no_grad():
        before = (start(images) - ref).pow(2).mean().item()
        after = (whole["model"](images) - ref).pow(2).mean().item()
    assert after < before and whole["steps"] == whole["total"] == 36
    saved = {}
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] == 15

    control = RunControl(should_stop=stop, checkpoint=lambda s: saved.update(state=copy.deepcopy(s)))
    part = distill_blocks(copy.deepcopy(start), dense, loader, cfg, control=control)
    assert part["stopped"] and saved["state"]["step"] == 15 and "opt" in saved["state"]
    rest = distill_blocks(copy.deepcopy(start), dense, loader, cfg, control=RunControl(resume=saved["state"]))
    a, b = whole["model"].state_dict(), rest["model"].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_class_token_weight_lowers_the_class_tokens_error(embedded):
    """With w_cls the last block's class-token output (what the classifier reads) ends closer to the
    dense one than without; the tokens weighed are the ones the model's pooling reads."""
    import timm

    from comcat.compression.convert import compress
    from comcat.compression.reconstruct import DistillConfig, distill_blocks, read_tokens

    dense = embedded.model
    loader = _loader(n=64)
    images = torch.cat([x for x, _ in loader])
    start = compress(dense, uniform_ranks(dense, "head", 0.25))

    def cls_error(w):
        small = distill_blocks(copy.deepcopy(start), dense, loader, DistillConfig(steps=6, cls_weight=w))["model"]
        with torch.no_grad():
            return (small.forward_features(images)[:, 0] - dense.forward_features(images)[:, 0]).pow(2).mean().item()

    assert cls_error(4.0) < cls_error(0.0)
    assert read_tokens(dense) == [0]
    kw = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2)
    assert read_tokens(timm.create_model("deit_tiny_distilled_patch16_224", **kw)) == [0, 1]
    assert read_tokens(timm.create_model("vit_tiny_patch16_224", global_pool="avg", **kw)) == []


def test_splits_are_disjoint_in_every_layout(tmp_path, embedded):
    from comcat.compression.splits import embedded_splits, folder_splits
    from comcat.core.shapes import SHAPES

    flat = tmp_path / "flat"
    png_folder(flat, 40, 0)
    classes = tmp_path / "classes"
    png_folder(classes, 40, 1, classes=list(SHAPES))
    imagenet = tmp_path / "imagenet"
    png_folder(imagenet / "train", 40, 2, classes=list(SHAPES))
    png_folder(imagenet / "val", 12, 3, classes=list(SHAPES))
    for root in (flat, classes, imagenet):
        s = folder_splits(root, embedded.model, seed=3, fit_images=8)
        train, fit, val, ev = (set(map(str, d.files)) for d in (s.train, s.fit, s.val, s.eval))
        assert train and val and ev and fit <= train
        assert not train & val and not train & ev and not val & ev
        assert len(train | val | ev) == len(s.train) + len(s.val) + len(s.eval)
        assert s.labeled == (root != flat)
    e = embedded_splits(8, 8, 8, 8)
    xs = [d.tensors[0] for d in (e.train, e.fit, e.val, e.eval)]
    assert all(not torch.equal(a, b) for i, a in enumerate(xs) for b in xs[i + 1 :])


def test_labels_only_when_they_are_the_models(tmp_path, embedded):
    from comcat.compression.splits import folder_splits

    mine = tmp_path / "mine"  # 3 classes of my own: not the model's 10
    png_folder(mine, 24, 0, classes=["cat", "dog", "fox"])
    s = folder_splits(mine, embedded.model)
    assert not s.labeled and "class folder 'cat' is not one of the model's classes" in s.note
    assert all(y == -1 for y in s.eval.labels)
    with pytest.raises(ComcatError, match="--labels"):
        folder_splits(mine, embedded.model, use_labels=True)
    flat = tmp_path / "flat"
    png_folder(flat, 24, 1)
    with pytest.raises(ComcatError, match="flat folder has no labels"):
        folder_splits(flat, embedded.model, use_labels=True)
    named = tmp_path / "named"  # folder names that are the model's label names map by name
    png_folder(named, 24, 2, classes=["star", "heart"])
    s = folder_splits(named, embedded.model)
    assert s.labeled and set(s.eval.labels) <= {3, 5}


def test_mixup_views_are_identical_for_teacher_and_student(embedded):
    """finetune() hands the teacher and the student the same mixed batch."""
    from comcat.compression.convert import compress
    from comcat.compression.distill import FinetuneConfig, finetune, mix_views

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    mixed, lam, perm = mix_views(x)
    assert 0 <= lam <= 1 and sorted(perm.tolist()) == list(range(8)) and not torch.equal(mixed, x)
    dense = copy.deepcopy(embedded.model)
    small = compress(dense, uniform_ranks(dense, "head", 0.5))
    seen = {"teacher": [], "student": []}
    dense.register_forward_pre_hook(lambda m, a: seen["teacher"].append(a[0].clone()))
    small.register_forward_pre_hook(lambda m, a: seen["student"].append(a[0].clone()))
    train = shapes_data(64, 4)
    finetune(small, dense, train, shapes_data(16, 5), FinetuneConfig(epochs=1, batch_size=32))
    teacher_views = [t for t in seen["teacher"] if t.shape[0] == 32]
    student_views = [t for t in seen["student"] if t.shape[0] == 32]
    assert len(student_views) == 2 and all(any(torch.equal(s, t) for t in teacher_views) for s in student_views)
    assert not any(torch.equal(s, train.tensors[0][:32]) for s in student_views)  # mixed, not the raw batch


def test_symlink_loops_are_not_followed(tmp_path):
    from PIL import Image

    from comcat.core.images import scan

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(5):
            Image.new("RGB", (8, 8)).save(tmp_path / d / f"{i}.png")
    (tmp_path / "a" / "loop").symlink_to("..")
    (tmp_path / "up").symlink_to(tmp_path)
    (tmp_path / "self").symlink_to("self")
    files, labels, classes = scan(tmp_path)
    assert classes == ["a", "b"] and len(files) == 10 and labels == [0] * 5 + [1] * 5
