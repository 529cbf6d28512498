"""Bad command lines: each ends in exit code 2, one line on stderr that says what to do, and no file
written or changed."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comcat.cli import main
from comcat.core.files import out_lock
from conftest import ROOT

HEARTS = ROOT / "assets" / "examples" / "heart"
ADAPTER = ROOT / "assets" / "examples" / "heart_adapter.safetensors"
DROP = object()
GEN = ["generate", "--prompt", "a V*", "--steps", "2", "--out", "OUT.png", "--adapter"]
SMALL = ["compress", "--distill-steps", "0", "--no-latency", "--out", "OUT", "--ranks"]
PROGRESS = re.compile(r"\d+/\d+ \[|\?/\?|\x1b\[A")  # tqdm bars (loading a pipeline shows some)


def _folders(tmp):
    few = tmp / "few"
    few.mkdir()
    for p in sorted(HEARTS.glob("*.png"))[:2]:
        shutil.copy(p, few)
    many = tmp / "many"
    many.mkdir()
    for i in range(11):
        shutil.copy(next(HEARTS.glob("*.png")), many / f"{i}.png")
    keep = tmp / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("the user's own file")
    _bad_adapters(tmp)
    _bad_runs(tmp)


def _bad_adapters(tmp):
    """The example adapter with one thing broken each."""
    with safe_open(str(ADAPTER), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    first = next(k for k in tensors if k != "token_embedding")

    def write(name, tensors=tensors, **changes):
        cfg = {k: v for k, v in {**config, **changes}.items() if v is not DROP}
        save_file(tensors, str(tmp / f"{name}.safetensors"), metadata={**meta, "config": json.dumps(cfg)})

    write("nan", {**tensors, first: tensors[first] * float("nan")})
    write("inf_token", {**tensors, "token_embedding": tensors["token_embedding"] / 0})
    write("int", {**tensors, first: tensors[first].to(torch.int32)})
    write("token_shape", {**tensors, "token_embedding": tensors["token_embedding"][:7]})
    write("big_rank", rank=10_000_000)
    write("bool_rank", rank=True)
    write("nan_scale", scale=float("nan"))
    write("unknown_key", evil="rm -rf /")
    save_file(tensors, str(tmp / "bad_json.safetensors"), metadata={**meta, "config": "{not json"})


def _bad_runs(tmp):
    """Rank files that are JSON but not rank configs, and folders of earlier runs (items 8, 10)."""
    (tmp / "ranks_int.json").write_text(json.dumps({"method": "head", "blocks": 6}))
    (tmp / "ranks_str.json").write_text(json.dumps({"method": "head", "blocks": ["qk"] * 6}))
    (tmp / "ranks_bool.json").write_text(json.dumps({"method": "head", "blocks": [{"qk": True, "vo": 4}] * 6}))
    (tmp / "ranks_cls.json").write_text(json.dumps({"method": "head", "blocks": [{"qk": 4, "vo": 4}] * 6, "head": "x"}))
    done = tmp / "done"
    done.mkdir()
    (done / "job.json").write_text(json.dumps({"format": "comcat-job/2", "phase": "done", "spec": {}}))
    (tmp / "adapter_run").mkdir()
    (tmp / "adapter_run" / "customize.json").write_text(json.dumps({"format": "comcat-customize/1", "step": 3}))


CASES = [
    (["analyze", "--energy", "nan"], "--energy must be in (0, 1]"),
    (["analyze", "--energy", "1.5"], "--energy must be in (0, 1]"),
    (["analyze", "--energy", "0"], "--energy must be in (0, 1]"),
    (["evaluate", "--batch-size", "0"], "--batch-size must be an integer in 1.."),
    (
        ["compress", "--params-ratio", "0.5", "--finetune-epochs", "1", "--lr", "nan", "--out", "OUT"],
        "the fine-tuning learning rate must be a positive number",
    ),
    (["compress", "--params-ratio", "0.5", "--distill-lr", "inf", "--out", "OUT"], "distillation learning rate must"),
    (["compress", "--params-ratio", "0.5", "--device", "foo", "--out", "OUT"], "is not a device"),
    (["compress", "--params-ratio", "0.5", "--device", "cuda:7", "--out", "OUT"], "no such CUDA GPU"),
    (
        ["compress", "--params-ratio", "0.5", "--distill-views", "-1", "--out", "OUT"],
        "distillation steps and views must be >= 0",
    ),
    (
        ["compress", "--params-ratio", "0.5", "--distill-cls", "nan", "--out", "OUT"],
        "the class-token weight must be a number >= 0",
    ),
    (
        ["compress", "--params-ratio", "0.5", "--calibration", "none", "--allocate", "calibrated", "--out", "OUT"],
        "drop --calibration none",
    ),
    (["customize", "--images", "few", "--prompt", "a V*", "--out", "OUT"], "a concept needs 3-10"),
    (["customize", "--images", "many", "--prompt", "a V*", "--out", "OUT"], "a concept needs 3-10"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--rank", "10000", "--out", "OUT"], "up to 64"),
    (
        ["customize", "--images", str(HEARTS), "--prompt", "a V*", "--lr", "nan", "--out", "OUT"],
        "must be positive numbers",
    ),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--out", "keep"], "is not a customize run folder"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--out", "/"], "is not a customize run folder"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--out", "keep/mine.txt"], "is a file"),
    (["compress", "--params-ratio", "0.5", "--out", "keep"], "is not a comcat model folder"),
    (["compress", "--params-ratio", "0.5", "--out", "keep/mine.txt"], "is a file"),
    (["generate", "--prompt", "a V*", "--n", "100000", "--out", "OUT.png"], "--n must be in 1..64"),
    (["generate", "--prompt", "a V*", "--device", "cuda", "--out", "OUT.png"], "no such CUDA GPU"),
    (GEN + [f"{ADAPTER}:nan"], "must be a finite number"),
    (GEN + ["nan.safetensors"], "holds NaN or inf values"),
    (GEN + ["inf_token.safetensors"], "token_embedding holds NaN or inf"),
    (GEN + ["int.safetensors"], "holds torch.int32 numbers"),
    (GEN + ["token_shape.safetensors"], "the token embedding has shape (7,)"),
    (GEN + ["big_rank.safetensors"], "up to 64"),
    (GEN + ["bool_rank.safetensors"], "up to 64"),
    (GEN + ["nan_scale.safetensors"], "scale must be a finite number"),
    (GEN + ["unknown_key.safetensors"], "invalid adapter metadata"),
    (GEN + ["bad_json.safetensors"], "invalid adapter metadata"),
    (SMALL + ["ranks_int.json"], '"blocks" is a list'),
    (SMALL + ["ranks_str.json"], '"blocks" is a list'),
    (SMALL + ["ranks_bool.json"], "rank qk=True is out of range"),
    (SMALL + ["ranks_cls.json"], "classifier rank 'x'"),
    (["compress", "--params-ratio", "0.5", "--out", "done"], "start over with --overwrite"),
    (["compress", "--resume", "done"], "already finished"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--out", "adapter_run"], "start over with --overwrite"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:3]) + " " + m[:20] for a, m in CASES])
def test_bad_command_line_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, args, message):
    if "cuda" in " ".join(args):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    _folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "keep" / "mine.txt").read_text() == "the user's own file"
    assert not os.path.exists(tmp_path / "OUT") and not os.path.exists(tmp_path / "OUT.png")


def test_a_second_writer_of_one_out_is_refused(tmp_path, capsys):
    """While one process holds a run folder (its lock), another compress or customize into it, or a
    resume of it, is refused in one line and changes nothing (item 8)."""
    out = tmp_path / "run"
    with out_lock(out):
        for args in (
            ["compress", "--params-ratio", "0.5", "--out", str(out)],
            ["customize", "--images", str(HEARTS), "--prompt", "a V*", "--out", str(out)],
            ["compress", "--resume", str(out)],
        ):
            assert main(args) == 2
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
            assert len(lines) == 1 and lines[0].endswith("wait for it to finish or choose another --out"), err
        assert [p.name for p in out.iterdir()] == [".comcat.lock"]
    assert not out.exists()  # the lock's folder goes when it is left empty


def test_class_folders_that_are_not_the_models_classes_give_no_top1():
    """Ten ImageNet-named folders are not the embedded model's ten shape classes: no labels, said why (item 12)."""
    from comcat.compression.images import label_map
    from comcat.compression.load import load_model

    model = load_model("embedded").model
    names = ["circle", "square", "triangle", "star", "cross", "heart", "ring", "crescent", "arrow", "semicircle"]
    assert label_map(sorted(names), model)[0] == sorted(range(10), key=lambda i: names[i])
    mapping, why = label_map(["goldfish", "hen", "ostrich", "stingray", "tench"] + names[:5], model)
    assert mapping is None and "'goldfish' is not one of the model's classes" in why
