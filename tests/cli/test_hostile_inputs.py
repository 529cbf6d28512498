"""Hostile and careless inputs (files that lie, huge counts, odd --out places): each is one line on
stderr, exit 2, no file changed, and memory stays bounded (peak RSS measured in a child process)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from comcat.cli import main
from conftest import ROOT

HEARTS = ROOT / "assets" / "examples" / "heart"
PEAK_MB = 2048


def _lying_model(root, name, change_kwargs, drop):
    """A compressed embedded model whose comcat.json says `change_kwargs` and whose weights lack the
    tensors whose names contain `drop`."""
    folder = root / name
    shutil.copytree(root / "small", folder)
    meta = json.loads((folder / "comcat.json").read_text())
    meta["arch_kwargs"] = {**meta["arch_kwargs"], **change_kwargs}
    (folder / "comcat.json").write_text(json.dumps(meta))
    weights = load_file(str(folder / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if drop not in k}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": meta["format"], "pair": meta["pair"]})


def _job(root, name, record):
    folder = root / name
    folder.mkdir()
    (folder / "job.json").write_text(record if isinstance(record, str) else json.dumps(record))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A folder of bad files, made once."""
    from comcat.compression.convert import compress
    from comcat.compression.format import save_compressed
    from comcat.compression.load import load_model
    from comcat.compression.models import Loaded
    from comcat.compression.rank_rules import uniform_ranks

    root = tmp_path_factory.mktemp("hostile")
    import timm

    save_file(timm.create_model("vit_tiny_patch16_224").state_dict(), str(root / "vit224.safetensors"))
    dense = load_model("embedded")
    save_compressed(Loaded(compress(dense.model, uniform_ranks(dense.model, "head", 0.5)), dense.arch), root / "small")
    _lying_model(root, "lying_classes", {"num_classes": 100_000_000}, "head.")
    _lying_model(root, "lying_mlp", {"mlp_ratio": 100_000.0}, ".mlp.")
    list_meta = root / "list_meta"
    shutil.copytree(root / "small", list_meta)
    (list_meta / "comcat.json").write_text("[1, 2]")
    binary_meta = root / "binary_meta"
    shutil.copytree(root / "small", binary_meta)
    (binary_meta / "comcat.json").write_bytes(b"\xff\xfe\x00binary")
    spec = {"model": "embedded", "ratio": 0.5}
    _job(root, "job_huge", {"format": "comcat-job/3", "phase": "ranks", "spec": {**spec, "train_images": 10**9}})
    _job(root, "job_list", "[1, 2, 3]")
    _job(root, "job_nospec", {"format": "comcat-job/3", "phase": "ranks"})
    _job(root, "job_unknown", {"format": "comcat-job/3", "phase": "ranks", "spec": {**spec, "distill": {"evil": 1}}})
    _job(root, "job_nostate", {"format": "comcat-job/3", "phase": "finetune", "spec": spec})
    (root / "ranks_deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "ranks_digits.json").write_text('{"method": "head", "blocks": [{"qk": ' + "9" * 5000 + ', "vo": 4}]}')
    (root / "ranks_binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (root / "ranks_dir.json").mkdir()
    (root / "data").mkdir()
    (root / "a_file").write_text("the user's own file")
    captioned = root / "captioned"
    shutil.copytree(HEARTS, captioned)
    first = sorted(p for p in captioned.iterdir() if p.suffix == ".png")[0]
    first.with_suffix(".txt").write_text("a V* " + "x" * 200_000)
    return root


SMALL = ["compress", "--distill-steps", "0", "--no-latency", "--out", "OUT", "--ranks"]
CUSTOMIZE = ["customize", "--prompt", "a V*", "--steps", "2", "--out", "OUT", "--images"]
CASES = [
    (["evaluate", "--model", "lying_classes"], "describes a model of"),
    (["evaluate", "--model", "lying_mlp"], "describes a model of"),
    (["compress", "--params-ratio", "0.5", "--train-images", "1000000000", "--out", "OUT"], "--train-images must be"),
    (["compress", "--params-ratio", "0.5", "--fit-images", "100000000", "--out", "OUT"], "--fit-images must be"),
    (["compress", "--resume", "job_huge"], "--train-images must be an integer in 1..50,000"),
    (["compress", "--resume", "job_list"], "holds a JSON list, not a comcat compress record"),
    (["compress", "--resume", "job_nospec"], "has no spec"),
    (["compress", "--resume", "job_unknown"], "distill settings has unknown settings (evil)"),
    (["compress", "--resume", "job_nostate"], "which its spec does not run"),
    (SMALL + ["ranks_deep.json"], "is not a rank file (nested too deeply)"),
    (SMALL + ["ranks_digits.json"], "is not a rank file (a number too long)"),
    (SMALL + ["ranks_binary.json"], "is not UTF-8 text, so not a rank file"),
    (SMALL + ["ranks_dir.json"], "is a folder, not a rank file"),
    (["evaluate", "--model", "list_meta"], "holds a JSON list, not a compressed model's record"),
    (["evaluate", "--model", "binary_meta"], "is not UTF-8 text"),
    (["compress", "--params-ratio", "0.5", "--out", "/proc/comcat"], "is in a kernel filesystem"),
    (["compress", "--params-ratio", "0.5", "--out", "a_file"], "is a file: choose a folder"),
    (["compress", "--params-ratio", "0.5", "--data", "data", "--out", "data"], "is your input data"),
    (["compress", "--model", "small", "--params-ratio", "0.5", "--out", "small"], "is your input small"),
    (["compress", "--params-ratio", "0.5", "--seed", "99999999999999999999", "--out", "OUT"], "--seed must be"),
    (["generate", "--prompt", "a V*", "--seed", "99999999999999999999", "--out", "OUT.png"], "--seed must be"),
    (["analyze", "--model", "a/.."], "is neither a file nor a hub id: a hub id is org/name"),
    (CUSTOMIZE + [str(HEARTS), "--batch-size", "100000"], "--batch-size must be an integer in 1..64"),
    (CUSTOMIZE + ["captioned"], "is over 64 kB: write one short sentence"),
    (["evaluate", "--batch-size", "100000000"], "--batch-size must be"),
    (["evaluate", "--model", "vit224.safetensors", "--arch", "vit_tiny_patch16_224"], "takes 224-px images"),
]


def _snapshot(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("args, message", CASES, ids=[f"{a[0]} {m[:30]}" for a, m in CASES])
def test_hostile_input_is_one_line_and_changes_nothing(hostile, capsys, monkeypatch, args, message):
    monkeypatch.chdir(hostile)
    before = _snapshot(hostile)
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error:", "Traceback"))]
    assert len(err) == 1 and message in err[0], err
    assert _snapshot(hostile) == before
    assert not os.path.exists(hostile / "OUT") and not os.path.exists(hostile / "OUT.png")


def test_memory_stays_bounded_on_every_hostile_input(hostile):
    """All the cases in one child process: its peak RSS (wait4's ru_maxrss) stays under 2 GB."""
    script = "import sys\nfrom comcat.cli import main\nfor args in __import__('json').loads(sys.argv[1]):\n"
    script += "    assert main(args) == 2, args\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps([a for a, _ in CASES])],
        cwd=hostile,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode()[-3000:]
    print(f"peak RSS over {len(CASES)} hostile inputs: {usage.ru_maxrss / 1024:.0f} MB")
    assert usage.ru_maxrss / 1024 < PEAK_MB, f"peak RSS {usage.ru_maxrss / 1024:.0f} MB"
