"""Truncation, search at matrix level, distillation, the compress run (stop/resume,
torchrun, bad inputs)."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from comcat.compression.convert import compress, truncate
from comcat.compression.cost import Budget
from comcat.compression.distill import FinetuneConfig
from comcat.compression.rank_rules import full_ranks, uniform_ranks
from comcat.compression.reconstruct import DistillConfig
from comcat.compression.search import SearchConfig
from comcat.core.errors import ComcatError
from comcat.core.loop import RunControl
from conftest import run_cli, shapes_data


@pytest.mark.parametrize("method", ["head", "matrix"])
def test_truncating_a_full_rank_model_equals_compressing(embedded, method):
    """Keeping the leading factor columns of the full-rank SVD model is the truncated SVD."""
    dense = embedded.model
    full = compress(dense, full_ranks(dense, method, mlp=True))
    cfg = uniform_ranks(dense, method, 0.4, mlp=True)
    cfg.blocks[1] = {k: max(1, r // 2) for k, r in cfg.blocks[1].items()}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cut, ref = truncate(full, cfg).eval()(x), compress(dense, cfg).eval()(x)
    assert torch.allclose(cut, ref, atol=1e-4)
    assert sum(p.numel() for p in truncate(full, cfg).parameters()) == sum(
        p.numel() for p in compress(dense, cfg).parameters()
    )


def test_matrix_search_hard_choice_and_fit_by_logits(embedded):
    from comcat.compression.cost import model_params
    from comcat.compression.search import RankSearch

    dense = embedded.model
    full = compress(dense, full_ranks(dense, "matrix"))
    cost_fn = lambda c: model_params(dense, c)  # noqa: E731
    search = RankSearch(full, cost_fn)
    assert search.method == "matrix" and set(search.choices) >= {"0_q", "0_k", "0_v", "0_o"}
    search.start_at(uniform_ranks(dense, "matrix", 0.5))
    chosen = search.chosen()
    assert chosen.blocks[0]["q"] == 32  # 0.5 * C / 2, a candidate of C = 128
    assert search.sample(1.0, sample=False).item() == pytest.approx(cost_fn(chosen))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = full.eval()(x)
        search.clear()
        assert torch.allclose(masked, compress(dense, chosen).eval()(x), atol=1e-4)
    # over budget: the step is taken where the logits lose least, block 3's v is nearly indifferent
    with torch.no_grad():
        for name, c in search.choices.items():
            c.alpha.copy_(torch.linspace(0, 5, len(c.alpha)))  # everyone prefers full rank strongly
        search.choices["3_v"].alpha.copy_(torch.linspace(0, 0.01, 8))
    target = cost_fn(search.chosen()) - 1
    fitted, reduced = search.fit(cost_fn, target)
    assert reduced and cost_fn(fitted) <= target
    assert fitted.blocks[3]["v"] == 112 and all(
        b[m] == 128 for i, b in enumerate(fitted.blocks) for m in "qko" if i != 3
    )
    # under budget: the rest of the budget is spent, one candidate step at a time, while it fits
    search.start_at(uniform_ranks(dense, "matrix", 0.3))
    target = cost_fn(search.chosen()) + 20_000
    filled, reduced = search.fit(cost_fn, target)
    assert not reduced and cost_fn(search.chosen()) < cost_fn(filled) <= target
    assert target - cost_fn(filled) < 256 * 16  # not even the cheapest next step would fit


def test_expected_rank_decoding_follows_the_logits_within_budget(embedded):
    from comcat.compression.cost import model_params
    from comcat.compression.search import RankSearch

    dense = embedded.model
    cost_fn = lambda c: model_params(dense, c)  # noqa: E731
    search = RankSearch(compress(dense, full_ranks(dense, "head")), cost_fn)
    with torch.no_grad():  # block 0 wants high ranks, block 3 low ones
        for name, c in search.choices.items():
            c.alpha.zero_()
        search.choices["0_qk"].alpha.copy_(torch.linspace(0, 6, 8))
        search.choices["3_vo"].alpha.copy_(torch.linspace(6, 0, 8))
    want = search.expected_ranks()
    assert want["1_qk"] == pytest.approx(sum(c for c in search.choices["1_qk"].ranks.tolist()) / 8)
    assert want["0_qk"] > want["1_qk"] > want["3_vo"]
    now = search.current()  # what progress shows: the rounded expected ranks
    assert now.blocks[0]["qk"] == round(want["0_qk"]) and now.blocks[3]["vo"] == round(want["3_vo"])
    assert search.current("argmax") == search.chosen()
    floor = cost_fn(search.config({n: 1 for n in want}))
    target = (floor + cost_fn(search.config({n: round(e) for n, e in want.items()}))) / 2
    ranks, reduced = search.fit_expected(cost_fn, target)
    assert reduced and cost_fn(ranks) <= target
    assert ranks.blocks[0]["qk"] > ranks.blocks[1]["qk"] > ranks.blocks[3]["vo"]
    cheapest = min(
        cost_fn(
            search.config(
                {
                    **{n: ranks.blocks[int(n.split("_")[0])][n.split("_")[1]] for n in want},
                    n: ranks.blocks[int(n.split("_")[0])][n.split("_")[1]] + 1,
                }
            )
        )
        for n in want
    )
    assert cheapest > target  # the rest of the budget was spent
    roomy, reduced = search.fit_expected(cost_fn, cost_fn(full_ranks(dense, "head")))
    assert not reduced and roomy.blocks[0]["qk"] == dense.blocks[0].attn.head_dim


def test_a_warm_started_search_that_learns_nothing_decodes_to_its_start(embedded):
    """The logits start at a distribution whose expected rank is each site's start rank, even where
    that rank lies below the candidates' spread (rank 1, with MLP candidates 16, 32, ...), so
    before any step the budget fit returns the start ranks.
    (Tilting towards the nearest candidate pulled every expected rank towards the candidates' mean,
    and a short search then lost the calibrated allocation: docs/method.md.)"""
    from comcat.compression.cost import model_params
    from comcat.compression.search import RankSearch

    dense = embedded.model
    cost_fn = lambda c: model_params(dense, c)  # noqa: E731
    start = uniform_ranks(dense, "head", 0.3, mlp=True)
    start.blocks[0].update(qk=29, vo=3, fc1=1, fc2=120)
    start.blocks[5].update(qk=2, fc1=90)
    search = RankSearch(compress(dense, full_ranks(dense, "head", mlp=True)), cost_fn)
    search.start_at(start)
    for name, want in search.expected_ranks().items():
        i, key = name.split("_", 1)
        assert want == pytest.approx(start.blocks[int(i)][key]), name
    assert search.choices["0_fc1"].alpha.softmax(-1).min() > 0.01  # every candidate stays reachable
    ranks, reduced = search.fit_expected(cost_fn, cost_fn(start))
    assert ranks.blocks == start.blocks and not reduced


def test_search_then_finetune_beats_no_finetuning(embedded):
    from comcat.compression.distill import finetune
    from comcat.compression.evaluate import evaluate
    from comcat.compression.search import search_ranks

    dense = embedded.model
    train, search, val = shapes_data(1024, 0), shapes_data(256, 2), shapes_data(500, 5)
    cfg = SearchConfig(epochs=1, batch_size=64, lr_weights=0)
    ranks, info = search_ranks(dense, train, search, Budget(0.15, mlp=True), cfg)
    small = info["model"]
    scores = evaluate(small, val, progress=False, per_image=True)
    before = scores["top1"]
    assert before < 97, "the budget should hurt before fine-tuning"
    right = scores["right"]  # per image: the same top-1, image by image
    x, y = val.tensors
    with torch.no_grad():
        assert torch.equal(right, small(x).argmax(1) == y) and right.float().mean() * 100 == pytest.approx(before)
    assert scores["nll"] > evaluate(dense, val, progress=False)["nll"] > 0
    events = []
    res = finetune(
        small,
        dense,
        train,
        search,
        FinetuneConfig(epochs=2, lr=1e-4, batch_size=64),
        control=RunControl(callback=events.append),
    )
    after_scores = evaluate(res["model"], val, progress=False)
    after = after_scores["top1"]
    assert after > before + 2 and after_scores["nll"] < scores["nll"]
    validated = [e for e in events if e["kind"] == "validate"]
    assert len(validated) == 3 and res["best"]["kl"] == min(e["kl"] for e in validated)
    assert [e["kind"] for e in events].count("finetune") == res["total"] == 32
    assert small.comcat_ranks is ranks or small.comcat_ranks.blocks == ranks.blocks


def test_nan_loss_is_a_clear_error(embedded):
    from torch.utils.data import TensorDataset

    from comcat.compression.search import search_ranks

    bad = TensorDataset(torch.full((8, 3, 32, 32), float("nan")), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ComcatError, match="NaN"):
        search_ranks(embedded.model, bad, bad, Budget(0.5, mlp=True), SearchConfig(epochs=1, batch_size=4))


SMALL = dict(
    mlp=True,
    ratio=0.4,
    search=SearchConfig(epochs=2, batch_size=32),
    finetune=FinetuneConfig(epochs=1, batch_size=32),
    train_images=256,
    fit_images=128,
    calibration_images=64,
    distill=DistillConfig(steps=5),
    latency=False,
)


def _weights(out):
    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow
def test_stop_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    """Stopped in the search, in block distillation and in fine-tuning, resumed each time: the same
    model as an uninterrupted run."""
    from comcat.compression.format import load_compressed
    from comcat.compression.job import JobSpec, run_job

    events = []
    whole = run_job(JobSpec(**SMALL), tmp_path / "whole", callback=events.append)
    assert whole["stopped"] is None and whole["report"]["search"]["cost"] <= whole["report"]["search"]["target"]
    assert json.loads((tmp_path / "whole" / "job.json").read_text())["phase"] == "done"
    assert not (tmp_path / "whole" / "state").exists()
    phases = [e["phase"] for e in events if e["kind"] == "phase"]
    assert phases == ["data", "calibrate", "allocate", "search", "distill", "finetune", "report"]
    steps = {k: sum(e["kind"] == k for e in events) for k in ("search", "distill", "finetune")}
    assert steps == {"search": 8, "distill": 30, "finetune": 8}  # 2 x 128/32; 6 blocks x 5; 256/32

    out, calls = tmp_path / "parts", {"n": 0}

    def stop_at(*at):
        def should_stop():
            calls["n"] += 1
            return calls["n"] in at

        return should_stop

    first = run_job(JobSpec(**SMALL), out, should_stop=stop_at(6))  # in the search's 2nd epoch
    assert first["stopped"] == "search"
    saved = load_compressed(out)  # the best valid model so far, within budget
    assert saved.meta["report"]["stopped"] == "search"
    assert saved.meta["report"]["search"]["cost"] <= saved.meta["report"]["search"]["target"]
    assert (out / "state" / "search.json").is_file() and "Stopped" in (out / "report.md").read_text()
    with pytest.raises(ComcatError, match="--resume"):
        run_job(JobSpec(**SMALL), out)  # a new run must not overwrite an unfinished one
    calls["n"] = 0
    second = run_job(None, out, resume=True, should_stop=stop_at(2 + 13))  # 2 search steps left, then block 2
    assert second["stopped"] == "distill" and (out / "state" / "distill.json").is_file()
    calls["n"] = 0
    third = run_job(None, out, resume=True, should_stop=stop_at(17 + 3))  # 17 distill steps left, then fine-tuning
    assert third["stopped"] == "finetune" and (out / "state" / "finetune.json").is_file()
    last = run_job(None, out, resume=True)
    assert last["stopped"] is None
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert last["report"]["compressed"]["top1"] == pytest.approx(whole["report"]["compressed"]["top1"])
    with pytest.raises(ComcatError, match="already finished"):
        run_job(None, out, resume=True)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    r = run_cli(
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "comcat",
        "compress",
        "--search",
        "--mlp",
        "--params-ratio",
        "0.5",
        "--search-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--train-images",
        "256",
        "--fit-images",
        "128",
        "--batch-size",
        "32",
        "--calibration-images",
        "64",
        "--distill-steps",
        "3",
        "--no-latency",
        "--out",
        str(out),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "comcat.json").read_text())
    assert meta["report"]["processes"] == 2
    # each process saw its half: 128 fit images / 2 processes / 32 per batch = 2 search steps (calibrated
    # factors stay fixed: no weight epochs); 256 training images / 2 / 32 = 4 fine-tuning steps
    assert meta["report"]["search"]["total"] == 2 and meta["report"]["finetune"]["total"] == 4
    assert meta["report"]["compressed"]["top1"] > 90
    assert r.stdout.count("saved ") == 1  # only the main process reports


def test_cli_search_bad_inputs_leave_nothing(tmp_path):
    from comcat.cli import main

    out = tmp_path / "o"
    assert main(["compress", "--search", "--params-ratio", "0.0001", "--out", str(out)]) == 2
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compress", "--search", "--params-ratio", "0.5", "--data", str(empty), "--out", str(out)]) == 2
    assert not out.exists()
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    for i in range(4):
        (bad / f"{i}.png").write_bytes(b"not an image")
    assert main(["compress", "--search", "--params-ratio", "0.5", "--data", str(bad.parent), "--out", str(out)]) == 2
    assert not out.exists()
    assert main(["compress", "--search", "--params-ratio", "0.5", "--ranks", "x.json", "--out", str(out)]) == 2
    assert main(["compress", "--resume", str(tmp_path / "nothing")]) == 2
    # NaN during the search (absurd weight learning rate): clear error, no folder left
    from comcat.compression.job import JobSpec, run_job

    with pytest.raises(ComcatError, match="NaN"):
        run_job(
            JobSpec(
                **{**SMALL, "calibration": "none", "search": SearchConfig(epochs=2, batch_size=32, lr_weights=1e12)}
            ),
            out,
        )
    assert not out.exists()


def test_cli_messages(capsys, tmp_path):
    from comcat.cli import main

    assert main(["compress", "--search", "--params-ratio", "0.5", "--search-epochs", "0", "--out", str(tmp_path)]) == 2
    assert "search epochs and batch size must be >= 1" in capsys.readouterr().err


def test_flops_budget_and_classifier_search(embedded):
    from comcat.compression.cost import layer_flops, model_flops
    from comcat.compression.search import search_ranks

    dense = embedded.model
    data = shapes_data(128, 3)
    budget = Budget(0.4, unit="flops", mlp=True)
    ranks, info = search_ranks(dense, data, data, budget, SearchConfig(epochs=1, batch_size=32, classifier=True))
    sites = lambda cfg: sum(l["attn"] + l["mlp"] for l in layer_flops(dense, cfg))  # noqa: E731
    assert info["target"] == pytest.approx(model_flops(dense) - 0.6 * sites(None))
    assert model_flops(dense, ranks) <= info["target"] and info["cost"] == model_flops(dense, ranks)
    assert ranks.classifier is not None and 1 <= ranks.classifier <= 10
    assert info["model"].head.rank == ranks.classifier


def test_report_files(tmp_path):
    from comcat.compression.job import JobSpec, run_job

    res = run_job(
        JobSpec(**{**SMALL, "search": SearchConfig(epochs=1, batch_size=32), "finetune": None, "latency": True}),
        tmp_path / "r",
    )
    md = (tmp_path / "r" / "report.md").read_text()
    assert "![ranks](ranks.png)" in md and "Rank search:" in md and "cpu_b32" in md
    assert (tmp_path / "r" / "ranks.png").stat().st_size > 1000
    lat = res["report"]["compressed"]["latency_ms"]
    assert set(lat) >= {"cpu_b1", "cpu_b32"} and all(v > 0 for v in lat.values())


def test_embedding_scores_measure_fidelity_without_a_classifier():
    from comcat.compression.evaluate import distance, fidelity, scores

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 16, generator=g)
    same = scores(ref.clone(), torch.full((40,), -1), ref, embeddings=True)
    assert same["cosine"] == pytest.approx(1.0) and same["retrieval"] == 100.0 and distance(same) == pytest.approx(0)
    noisy = scores(
        ref + 0.8 * torch.randn(40, 16, generator=g), torch.zeros(40, dtype=torch.long), ref, embeddings=True
    )
    assert 0 < noisy["cosine"] < 1 and noisy["retrieval"] < 100 and "top1" not in noisy and "agreement" not in noisy
    assert fidelity(noisy).startswith("cosine 0.") and distance({"kl": 0.3}) == 0.3  # runs recorded before 'distance'


def test_a_model_without_a_classifier_is_compressed_and_reported_by_embedding_fidelity(tmp_path):
    """A timm ViT with num_classes=0 (a DINOv2-style backbone): the compress run calibrates and
    distills it, and its report gives cosine and nearest-image agreement, no top-1; the rank search
    and fine-tuning match its embeddings."""
    from test_models_and_format import _timm_export

    from comcat.compression.job import JobSpec, run_job
    from conftest import png_folder

    _timm_export(tmp_path / "backbone", num_classes=0)
    data = png_folder(tmp_path / "photos", 60, 4)
    spec = JobSpec(
        model=str(tmp_path / "backbone"), data=str(data), ratio=0.5, calibration_images=24,
        distill=DistillConfig(steps=3), latency=False,
    )  # fmt: skip
    res = run_job(spec, tmp_path / "small")
    c = res["report"]["compressed"]
    assert 0 < c["cosine"] <= 1 and 0 <= c["retrieval"] <= 100 and "top1" not in c and "agreement" not in c
    assert all("cosine" in v for v in res["report"]["validation"].values())
    report = (tmp_path / "small" / "report.md").read_text()
    assert "cosine to dense" in report and "no classifier" in report
    tuned = run_job(
        replace(spec, search=SearchConfig(epochs=1), finetune=FinetuneConfig(epochs=1)), tmp_path / "searched"
    )
    assert tuned["report"]["ranks"]["note"]["rule"].startswith("search") and 0 < tuned["report"]["compressed"]["cosine"]


@pytest.mark.slow
def test_search_and_fine_tuning_of_a_backbone_bring_its_embeddings_closer(tmp_path):
    """The embedded model without its classifier (a checkpoint without head.weight loads as a
    backbone): at a low budget, a rank search and three fine-tuning epochs, both matching the dense
    embeddings, give a higher held-out cosine to the dense model than calibration alone."""
    from safetensors.torch import save_file

    from comcat.compression.load import load_model
    from conftest import png_folder

    state = {k: v for k, v in load_model("embedded").model.state_dict().items() if not k.startswith("head.")}
    save_file(state, str(tmp_path / "backbone.safetensors"))
    data = png_folder(tmp_path / "photos", 200, 6)
    common = ["--model", str(tmp_path / "backbone.safetensors"), "--arch", "comcat_shapes_vit", "--data", str(data)]
    common += [
        "--params-ratio",
        "0.15",
        "--mlp",
        "lowrank",
        "--allocate",
        "uniform",
        "--distill-steps",
        "0",
        "--no-latency",
    ]
    runs = {"plain": [], "tuned": ["--search", "--search-epochs", "1", "--finetune-epochs", "3"]}
    cosine = {}
    for label, extra in runs.items():
        r = run_cli("-m", "comcat", "compress", *common, "--workers", "0", *extra, "--out", str(tmp_path / label))
        assert r.returncode == 0, r.stderr[-2000:]
        cosine[label] = json.loads((tmp_path / label / "comcat.json").read_text())["report"]["compressed"]["cosine"]
    assert cosine["plain"] < cosine["tuned"] <= 1, cosine
