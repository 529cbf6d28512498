import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comcat.cli import main
from comcat.core.shapes import SHAPES, make_shapes
from conftest import run_cli


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    """A small ImageFolder of held-out shapes, classes in SHAPES order (sorted folder names)."""
    root = tmp_path_factory.mktemp("shapes")
    images, labels, _ = make_shapes(60, seed=7)
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / f"{y:02d}_{SHAPES[y]}"
        d.mkdir(exist_ok=True)
        Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, shapes_folder):
    r = run_cli("-m", "comcat", "analyze", "--json", str(tmp_path / "a.json"), "--plots", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr
    assert "head level" in r.stdout
    a = json.loads((tmp_path / "a.json").read_text())
    assert len(a["singular_values"]["vo"]) == 6
    assert (tmp_path / "plots" / "energy_heatmaps.png").stat().st_size > 10_000

    out = tmp_path / "small"
    r = run_cli(
        "-m",
        "comcat",
        "compress",
        "--method",
        "head",
        "--params-ratio",
        "0.5",
        "--allocate",
        "energy",
        "--mlp",
        "--calibration-images",
        "128",
        "--distill-steps",
        "5",
        "--no-latency",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "comcat.json").read_text())
    assert meta["report"]["compressed"]["params"] < 0.6 * meta["report"]["dense"]["params"]
    assert meta["flops"] == meta["report"]["compressed"]["flops"] and meta["arch"] == "comcat_shapes_vit"
    assert meta["metrics"]["compressed"]["top1"] > 90
    assert (out / "report.md").read_text().startswith("# comcat compression report")

    r = run_cli("-m", "comcat", "evaluate", "--model", str(out), "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["images"] == 2000
    assert e["top1"] == pytest.approx(meta["report"]["compressed"]["top1"], abs=1e-9)

    # the same model on an ImageFolder of PNGs goes through timm transforms and gives the same labels
    r = run_cli("-m", "comcat", "evaluate", "--data", str(shapes_folder), "--json", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "f.json").read_text())["images"] == 60


def help_text(cmd, capsys):
    with pytest.raises(SystemExit) as done:
        main([cmd, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_cli_help_explains_every_flag(capsys):
    from comcat.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for cmd, parser in sub.choices.items():
        text = help_text(cmd, capsys)
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 15, f"{cmd} {action.option_strings} has no help"
                assert action.option_strings[-1] in text
    assert "--allocate" in help_text("compress", capsys)


def test_help_starts_without_torch(tmp_path):
    """--help answers at once: the parser and `import comcat` load no heavy library; run
    outside the repository, as an installed package (and its `comcat` command) is."""
    code = (
        "import sys, comcat, comcat.cli; comcat.cli.build_parser().format_help(); "
        "print(sorted(m for m in ('torch', 'timm', 'diffusers', 'gradio') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    command = Path(sys.executable).with_name("comcat")
    out = subprocess.run(
        [str(command), "compress", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )
    assert out.returncode == 0 and "examples:" in out.stdout, out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "--model", "resnet18"], "not a model family comcat supports"),
        (["evaluate", "--model", "nope/missing.pth", "--arch", "vit_tiny_patch16_224"], "does not exist"),
        (["evaluate", "--model", "missing.safetensors"], "does not exist"),  # before asking for --arch
        (["compress", "--params-ratio", "0", "--out", "OUT"], "ratio must be in"),
        (["compress", "--energy", "1.5", "--out", "OUT"], "energy threshold must be in"),
        (["compress", "--ranks", "RANKS", "--out", "OUT"], "has 1 blocks"),
        (["evaluate", "--data", "EMPTY"], "no images"),
        (["evaluate", "--data", "CORRUPT"], "cannot read image"),
    ],
)
def test_cli_bad_inputs(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "CORRUPT" / "cls").mkdir(parents=True)
    (tmp_path / "CORRUPT" / "cls" / "x.png").write_bytes(b"not a png")
    (tmp_path / "RANKS").write_text(json.dumps({"method": "head", "blocks": [{"qk": 4, "vo": 4}]}))
    args = [str(tmp_path / a) if a in ("OUT", "RANKS", "EMPTY", "CORRUPT") else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "OUT").exists()


def test_shapes_are_deterministic_and_balanced():
    a, la, sa = make_shapes(50, seed=3)
    b, lb, _ = make_shapes(50, seed=3)
    c, _, _ = make_shapes(50, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert a.shape == (50, 32, 32, 3) and a.dtype == np.uint8
    assert np.bincount(la, minlength=len(SHAPES)).tolist() == [5] * 10
    assert sa[0].caption.startswith(f"a {sa[0].colour} {sa[0].shape}")


@pytest.mark.slow
def test_cli_compress_with_rank_file_matrix_method(tmp_path, capsys):
    ranks = {"method": "matrix", "blocks": [{"q": 8, "k": 8, "v": 24, "o": 24, "fc2": 32}] * 6, "head": None}
    (tmp_path / "r.json").write_text(json.dumps(ranks))
    assert (
        main(
            [
                "compress",
                "--method",
                "matrix",
                "--ranks",
                str(tmp_path / "r.json"),
                "--no-latency",
                "--calibration-images",
                "64",
                "--distill-steps",
                "2",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "m" / "comcat.json").read_text())
    assert meta["ranks"]["blocks"] == ranks["blocks"] and meta["method"] == "matrix"
    assert "top-1" in capsys.readouterr().out
    # a rank file for the other method is refused in one line
    assert (
        main(["compress", "--method", "head", "--ranks", str(tmp_path / "r.json"), "--out", str(tmp_path / "n")]) == 2
    )
    assert "make them agree" in capsys.readouterr().err
