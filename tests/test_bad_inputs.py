"""Bad command lines: each ends in exit code 2, one line on stderr that says what to do, and no file
written or changed (issue 17)."""
import os
import re
import shutil

import pytest

from comcat.cli import main
from conftest import ROOT

HEARTS = ROOT / "assets" / "examples" / "heart"
PROGRESS = re.compile(r"\d+/\d+ \[|\?/\?|\x1b\[A")       # tqdm bars (loading a pipeline shows some)


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


CASES = [
    (["analyze", "--energy", "nan"], "--energy must be in (0, 1]"),
    (["analyze", "--energy", "1.5"], "--energy must be in (0, 1]"),
    (["analyze", "--energy", "0"], "--energy must be in (0, 1]"),
    (["evaluate", "--batch-size", "0"], "batch size must be >= 1"),
    (["compress", "--params-ratio", "0.5", "--lr", "nan", "--out", "OUT"], "--lr must be a positive number"),
    (["compress", "--params-ratio", "0.5", "--distill-lr", "inf", "--out", "OUT"], "--distill-lr must be"),
    (["compress", "--params-ratio", "0.5", "--device", "foo", "--out", "OUT"], "is not a device"),
    (["compress", "--params-ratio", "0.5", "--device", "cuda:7", "--out", "OUT"], "no such CUDA GPU"),
    (["compress", "--params-ratio", "0.5", "--distill-views", "-1", "--out", "OUT"], "--distill-views >= 0"),
    (["compress", "--params-ratio", "0.5", "--calibration", "none", "--allocate", "calibrated", "--out", "OUT"],
     "drop --calibration none"),
    (["customize", "--images", "few", "--prompt", "a V*", "--out", "OUT"], "a concept needs 3-10"),
    (["customize", "--images", "many", "--prompt", "a V*", "--out", "OUT"], "a concept needs 3-10"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--rank", "10000", "--out", "OUT"],
     "up to 64"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--lr", "nan", "--out", "OUT"],
     "must be positive numbers"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--out", "keep"], "is not a customize run folder"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--out", "/"], "is not a customize run folder"),
    (["customize", "--images", str(HEARTS), "--prompt", "a V*", "--out", "keep/mine.txt"], "is a file"),
    (["compress", "--params-ratio", "0.5", "--out", "keep"], "is not a comcat model folder"),
    (["compress", "--params-ratio", "0.5", "--out", "keep/mine.txt"], "is a file"),
    (["generate", "--prompt", "a V*", "--n", "100000", "--out", "OUT.png"], "--n must be in 1..64"),
    (["generate", "--prompt", "a V*", "--device", "cuda", "--out", "OUT.png"], "no such CUDA GPU"),
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
