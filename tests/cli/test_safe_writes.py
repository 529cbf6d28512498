"""No run replaces a file it did not make: foreign folders are refused byte for byte, special files
are written into (never replaced), a stopped run exits 3, and a save killed at any instant leaves a
pair that loads and a run that resumes."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from comcat.cli import main
from conftest import ROOT, run_cli

HEARTS = ROOT / "assets" / "examples" / "heart"


def _theirs(tmp_path):
    """A user's folder holding files with the names a run writes, and one of their own."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for name in ("notes.txt", "adapter.safetensors", "model.safetensors", "report.md", "ranks.png"):
        (theirs / name).write_bytes(f"the user's own {name}".encode())
    return theirs, {p.name: p.read_bytes() for p in theirs.iterdir()}


@pytest.mark.parametrize(
    "args",
    [
        ["customize", "--images", str(HEARTS), "--prompt", "a V*", "--steps", "2"],
        ["customize", "--images", str(HEARTS), "--prompt", "a V*", "--steps", "2", "--overwrite"],
        ["compress", "--params-ratio", "0.5", "--distill-steps", "0"],
        ["compress", "--params-ratio", "0.5", "--distill-steps", "0", "--overwrite"],
    ],
    ids=["customize", "customize-overwrite", "compress", "compress-overwrite"],
)
def test_a_foreign_folder_is_refused_and_every_file_stays_byte_identical(tmp_path, capsys, args):
    theirs, before = _theirs(tmp_path)
    assert main([*args, "--out", str(theirs)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "is not a" in err[0] and "choose an empty or new --out" in err[0], err
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == before


def test_a_finished_customize_run_keeps_only_the_adapter_and_its_record(tmp_path):
    out = tmp_path / "run"
    assert main(["customize", "--images", str(HEARTS), "--prompt", "a V*", "--steps", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "customize.json", "previews"]
    assert json.loads((out / "customize.json").read_text())["done"] is True


def test_json_output_is_written_into_pipes_and_devices_never_replacing_them(tmp_path):
    """--json /dev/stdout prints; a FIFO is written into; /dev/full gives one line and stays a device."""
    r = run_cli("-m", "comcat", "analyze", "--json", "/dev/stdout")
    assert r.returncode == 0 and '"summary"' in r.stdout, r.stderr
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    r = run_cli("-m", "comcat", "analyze", "--json", str(fifo))
    got = reader.communicate(timeout=60)[0]
    assert r.returncode == 0 and json.loads(got)["model"] == "embedded", r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if os.path.exists("/dev/full"):
        r = run_cli("-m", "comcat", "analyze", "--json", "/dev/full")
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "error: could not write to /dev/full (No space left on device): give another file"
        ]
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    link = tmp_path / "to_stdout"
    link.symlink_to("/proc/self/fd/1")
    r = run_cli("-m", "comcat", "analyze", "--json", str(link))
    assert r.returncode == 0 and '"summary"' in r.stdout and link.is_symlink(), r.stderr
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert main(["analyze", "--json", str(folder)]) == 2 and folder.is_dir()


KILL_AT = """
import os, signal, sys
from comcat.compression import format
at, calls, replace = int(sys.argv[1]), [0], os.replace
def killing_replace(a, b):  # kill -9 just before the at-th rename of a save
    if sys._getframe(1).f_code.co_filename == format.__file__:
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace(a, b)
os.replace = killing_replace
from comcat.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _kill_at(at: int, *args: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", KILL_AT, str(at), *args], cwd=ROOT, env=env, capture_output=True)


SMALL_RUN = ["--params-ratio", "0.5", "--train-images", "64", "--fit-images", "64", "--calibration-images", "32"]
SMALL_RUN += ["--distill-views", "0", "--no-latency"]


@pytest.mark.parametrize("step", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow), 3])
def test_a_save_killed_at_each_step_leaves_a_pair_that_loads(tmp_path, step):
    """The second save of a run (the folder already holds a pair) killed before its commit (1), after
    it (2: the weights not yet moved; 3: comcat.json not yet moved): the folder loads as one pair."""
    from comcat.compression.format import load_compressed

    out = tmp_path / "run"
    r = _kill_at(3 + step, "compress", *SMALL_RUN, "--distill-steps", "2", "--no-eval", "--out", str(out))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    loaded = load_compressed(out)  # one pair, old (killed before the commit) or new
    meta = json.loads((out / "comcat.json").read_text())
    assert meta["pair"] == loaded.meta["pair"] and not any(p.name.startswith(".save.") for p in out.iterdir())
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in loaded.model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_run_killed_at_each_step_of_a_save_resumes_to_the_end(tmp_path, step):
    out = tmp_path / "run"
    r = _kill_at(3 + step, "compress", *SMALL_RUN, "--distill-steps", "2", "--out", str(out))
    assert r.returncode == -signal.SIGKILL
    r = run_cli("-m", "comcat", "compress", "--resume", str(out))
    assert r.returncode == 0 and "saved" in r.stdout, r.stderr[-2000:]
    assert json.loads((out / "job.json").read_text())["phase"] == "done"
    r = run_cli("-m", "comcat", "evaluate", "--model", str(out))
    assert r.returncode == 0 and "top-1" in r.stdout, r.stderr[-2000:]


def test_ctrl_c_stops_a_run_with_exit_code_3_and_it_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["customize", "--images", str(HEARTS), "--prompt", "a V*", "--steps", "400", "--preview-every", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "comcat", *args, "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(600):
        if (out / "customize.json").is_file() or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "stopped at step" in stdout, stderr[-2000:]
    assert (out / "state.json").is_file() and json.loads((out / "customize.json").read_text()).get("done") is False


def test_a_huge_sentence_line_is_cut_before_the_tokenizer_sees_it(tmp_path):
    from comcat.compression.texts import read_sentences
    from comcat.core.records import MAX_LINE_CHARS

    text = tmp_path / "sentences.txt"
    text.write_text("a short one\n" + "word " * 2_000_000 + "\n\nlast\n")
    lines = read_sentences(text)
    assert [len(x) for x in lines] == [11, MAX_LINE_CHARS, 4]


def test_evaluate_says_when_it_scores_the_images_a_run_trained_on(tmp_path, capsys):
    from conftest import png_folder

    data = png_folder(tmp_path / "shapes", 24, 5)
    out = tmp_path / "small"
    args = ["compress", "--params-ratio", "0.5", "--distill-steps", "0", "--no-latency", "--data", str(data)]
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(data)]) == 0
    said = capsys.readouterr().out
    assert "including the ones its compress run fitted and validated on" in said and "report.md" in said
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(png_folder(tmp_path / "other", 8, 9))]) == 0
    assert "including the ones" not in capsys.readouterr().out
