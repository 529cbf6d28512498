"""The app's handlers called directly (no server, no browser)."""

import json
import os
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

gr = pytest.importorskip("gradio")

from app import common, pipelines  # noqa: E402
from app.runner import Busy, Runner  # noqa: E402
from app.tabs import compress as compress_page  # noqa: E402
from app.tabs import explore as explore_page  # noqa: E402
from app.tabs import generate as generate_page  # noqa: E402


def test_explore_embedded_gives_plots_summary_and_exports():
    heat, heads, curves, summary, files, table, advice, slider, state = explore_page.on_explore(
        "embedded", "", None, "", list(explore_page.PLOT_NAMES), 1
    )
    assert slider["maximum"] == 5 and slider["value"] == 1  # the embedded model's 6 layers
    assert explore_page.on_explore("embedded", "", None, "", [], 11)[7]["value"] == 5
    assert "At **50%** of the attention parameters" in advice and "0.84× dense" in advice
    assert "At **30%**" in explore_page.on_budget(state, 0.3) and explore_page.on_budget(None, 0.3) is not None
    assert len(table) == 6 * 6 and table[0][:2] == [0, "q"] and "Most learned low-rank structure" in summary
    assert sorted(Path(f).name for f in files) == [
        "energy_heatmaps.png",
        "layers.csv",
        "param_curves.png",
        "spectra.json",
    ]
    assert len(heat.data) == 6 and heat.data[0].z.shape[0] == state.spectra.depth
    assert len(heads.data) == 2 * state.spectra.num_heads
    head_curve = next(t for t in curves.data if t.name.startswith("head"))
    matrix_curve = next(t for t in curves.data if t.name.startswith("matrix"))
    assert all(h <= m for h, m in zip(head_curve.y, matrix_curve.y))  # head level never needs more
    assert "head level" in summary and "embedded" in summary
    spectra = json.loads(open(next(f for f in files if f.endswith(".json"))).read())
    assert spectra["depth"] == state.spectra.depth and len(spectra["singular_values"]["qk"]) == spectra["depth"]
    assert sum(f.endswith(".png") for f in files) == 2
    heat2, heads2 = explore_page.on_replot(state, ["W^QK per head"], 0)
    assert len(heat2.data) == 1 and "layer 0" in heads2.layout.annotations[0].text


@pytest.mark.parametrize(
    "source,name,upload,arch,expect",
    [
        ("uploaded checkpoint", "", None, "", "upload a checkpoint first"),
        ("timm name", "no_such_model_xyz", None, "", "is not a timm model name"),
    ],
)
def test_explore_bad_input_is_one_readable_line(source, name, upload, arch, expect):
    out = explore_page.on_explore(source, name, upload, arch, list(explore_page.PLOT_NAMES), 0)
    assert out[0] is None and expect in out[3] and "\n" not in out[3] and "Traceback" not in out[3]


def test_explore_refuses_a_non_checkpoint_upload(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert "not a checkpoint" in explore_page.on_explore("uploaded checkpoint", "", str(bad), "", [], 0)[3]
    fake = tmp_path / "weights.safetensors"
    fake.write_bytes(b"garbage")
    msg = explore_page.on_explore("uploaded checkpoint", "", str(fake), "vit_tiny_patch16_224", [], 0)[3]
    assert msg.startswith("**Error:**") and "\n" not in msg


def test_stop_stops_only_the_visitors_own_run():
    r = Runner("test")
    gate = threading.Event()
    job = r.start(lambda cb, stop: gate.wait(5) and not stop(), owner="alice")
    with pytest.raises(Busy, match="another visitor's test job is already running: wait for it to finish$"):
        r.start(lambda cb, stop: None, owner="bob")
    assert r.stop("bob") == "other" and not job.stopping
    assert r.stop("alice") == "stopping" and job.stopping
    gate.set()
    list(job.stream(0.01))
    assert job.result is False


def test_runner_runs_one_job_at_a_time_and_stops():
    r = Runner("test")
    steps = []

    def job(callback, should_stop):
        for i in range(1000):
            if should_stop():
                return "stopped"
            callback(i)
            steps.append(i)
            time.sleep(0.005)
        return "done"

    first = r.start(job)
    with pytest.raises(Busy, match="already running"):
        r.start(job)
    seen, stopped = [], False
    for events in first.stream(0.02):
        seen += events
        if len(seen) > 5 and not stopped:
            stopped = r.stop()
            assert stopped == "stopping" and first.stopping
    assert first.result == "stopped" and seen == steps and len(steps) < 1000
    assert r.stop() == "idle"
    failed = r.start(lambda cb, stop: 1 / 0)  # errors are kept for the page, and the lock is freed
    list(failed.stream(0.01))
    assert isinstance(failed.error, ZeroDivisionError) and not r.running
    assert first.result == "stopped"  # a later job never changes an earlier job's result


TINY = dict(
    ratio=0.5,
    budget="params",
    method="head",
    search=True,
    search_epochs=1,
    distill_steps=3,
    finetune_epochs=1,
    mlp=True,
    data_source="embedded shapes",
    data_path="",
    data_zip=None,
    device="cpu",
    train_images=64,
    fit_images=64,
)


@pytest.mark.slow
def test_whole_model_int8_and_onnx_from_the_page(tmp_path):
    """The default whole-model budget with int8 and an ONNX file: the card gives the model's share of the
    parameters first, its MB in int8 beside float32 and dense int8; the zip reloads as int8; the ONNX
    file runs in ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    from comcat.compression.export import onnx_outputs
    from comcat.compression.format import load_compressed

    settings = {**TINY, "search": False, "finetune_epochs": 0, "mlp": False, "int8": True, "onnx": True}
    head, _, _, card, download, _, onnx_file = list(compress_page.on_compress(**settings))[-1]
    assert head.startswith("**Done**"), head
    assert "**model at 0.50× of its parameters**" in card and "MLPs at" in card and "**int8:" in card
    assert "dense int8" in card and "ONNX (int8, ONNX Runtime)" in card
    with zipfile.ZipFile(download) as z:
        z.extractall(tmp_path / "unzipped")
    small = load_compressed(tmp_path / "unzipped")
    assert small.meta["quantized"] == "int8" and small.meta["ranks"]["blocks"][0]["neurons"] >= 1
    assert onnx_outputs(onnx_file, torch.randn(3, 3, 32, 32)).shape == (3, 10)


@pytest.mark.slow
def test_compress_streams_progress_and_exports_a_reloadable_zip(tmp_path):
    from comcat.compression.format import load_compressed

    updates = list(compress_page.on_compress(**TINY))
    statuses = [u[0] for u in updates if isinstance(u[0], str)]
    assert statuses[0].startswith("**starting**")  # phase lines depend on poll timing: see the next test
    head, ranks, losses, card, download, run_dir, _ = updates[-1]
    assert head.startswith("**Done**") and "agreement with the dense model" in card and "top-1" in card
    assert "held-out images" in card and "params" in card
    assert len(ranks.data) == 1 and {t.name for t in losses.data} >= {
        "search (α steps)",
        "block distillation",
        "end-to-end fine-tuning",
    }
    with zipfile.ZipFile(download) as z:
        z.extractall(tmp_path / "unzipped")  # the files at the zip's root: the folder loads
    small = load_compressed(tmp_path / "unzipped")
    assert small.meta["ranks"]["method"] == "head" and not (tmp_path / "unzipped" / "state").exists()


def test_progress_status_follows_the_events():
    """Each phase's status line (the tiny run above may finish a phase between two polls)."""
    p = compress_page.Progress()
    p.update({"kind": "phase", "phase": "search"})
    p.update(
        {
            "kind": "search",
            "phase": "search",
            "step": 2,
            "total": 8,
            "loss": 1.5,
            "cost": 120.0,
            "target": 100.0,
            "tau": 3.2,
            "ranks": None,
        }
    )
    s = p.status()
    assert s.startswith("**search**") and "step 2/8" in s and "120% of budget" in s and "τ 3.20" in s and "ETA" in s
    p.update({"kind": "phase", "phase": "distill"})
    p.update({"kind": "distill", "block": 2, "blocks": 6, "step": 13, "total": 30, "loss": 0.0123})
    assert "block 3/6" in p.status() and "loss 0.0123" in p.status()
    p.update({"kind": "phase", "phase": "finetune"})
    p.update({"kind": "validate", "step": 0, "total": 4, "images": 100, "agreement": 91.0, "kl": 0.2, "top1": 97.5})
    p.update({"kind": "finetune", "step": 1, "total": 4, "loss": 0.25})
    s = p.status()
    assert s.startswith("**finetune**") and "step 1/4" in s and "loss 0.250" in s
    assert "validation (100 held-out images): agreement 91.0%, KL 0.2000 against dense, top-1 97.5%" in s
    assert [len(p.losses[k]) for k in ("search", "weights", "distill", "finetune")] == [1, 0, 1, 1]
    p.update({"kind": "done", "stopped": None, "report": {}})
    assert p.status().startswith("**done**") and "ETA" not in p.status()


@pytest.mark.slow
def test_stop_keeps_the_best_model_and_resume_finishes_the_run():
    long = {**TINY, "search_epochs": 4, "train_images": 256, "fit_images": 256}
    run = compress_page.on_compress(**long)
    first = next(run)[0]
    assert first.startswith("**starting**")
    busy = list(compress_page.on_compress(**TINY))
    assert len(busy) == 1 and "already running" in busy[0][0]
    for update in run:
        if "step" in str(update[0]) and "search" in str(update[0]):
            assert compress_page.on_stop().startswith("**stopping**")
            break
    final = list(run)[-1]
    assert final[0].startswith("**Stopped** during search") and "Stopped" in final[3] and "Resume" in final[0]
    assert compress_page.on_stop() == "nothing is running"
    run_dir = final[5]
    resumed = list(compress_page.on_compress_resume(run_dir))
    assert resumed[-1][0].startswith("**Done**") and "agreement with the dense model" in resumed[-1][3]
    assert "nothing to resume" in next(compress_page.on_compress_resume(None))[0]
    assert "already finished" in list(compress_page.on_compress_resume(run_dir))[-1][0]


def test_compress_an_uploaded_checkpoint_on_a_flat_folder(tmp_path):
    """A checkpoint uploaded in the page, compressed on a zip of unlabeled images: agreement, no top-1."""
    from conftest import checkpoint_and_photos

    ckpt, zpath = checkpoint_and_photos(tmp_path)
    missing = next(
        compress_page.on_compress(
            model_source="uploaded checkpoint",
            upload=str(ckpt),
            arch="",
            data_source="uploaded zip",
            data_zip=str(zpath),
        )
    )[0]
    assert "architecture" in missing and "--arch" not in missing
    updates = list(
        compress_page.on_compress(
            model_source="uploaded checkpoint",
            upload=str(ckpt),
            arch="comcat_shapes_vit",
            data_source="uploaded zip",
            data_zip=str(zpath),
            distill_steps=2,
            device="cpu",
        )
    )
    head, _, _, card, download, _, _ = updates[-1]
    assert head.startswith("**Done**"), head
    assert "agreement with the dense model" in card and "no top-1: labels not used: a flat folder has no labels" in card
    assert (
        "top-1 **" not in card and "heads that lost most (relative weight error of the per-head product): layer" in card
    )
    assert "of photos" in card and "comcat-app" not in card
    # the download names the visitor's file, holds no server path, reloads anywhere, and analyze says what to pass
    from comcat.cli import main
    from comcat.compression.format import load_compressed

    unpacked = tmp_path / "downloaded"
    with zipfile.ZipFile(download) as z:
        assert sorted(z.namelist()) == ["comcat.json", "model.safetensors", "ranks.png", "report.md"]
        assert not any(b"comcat-app" in z.read(n) for n in ("comcat.json", "report.md"))
        z.extractall(unpacked)
    assert load_compressed(unpacked).meta["source"] == "mine.safetensors"
    assert main(["analyze", "--model", str(unpacked)]) == 2
    assert main(["analyze", "--model", str(unpacked), "--dense", str(ckpt)]) == 0


def test_explore_recommends_with_images_and_compares_a_compressed_model(tmp_path):
    """The recommendation calibrated on images, and a compressed model (the zip Compress
    gives) against the explored dense one: the heads it lost most, a heatmap and exports."""
    from dataclasses import replace

    from comcat.compression.convert import compress
    from comcat.compression.format import save_compressed
    from comcat.compression.load import load_model
    from comcat.compression.rank_rules import uniform_ranks
    from comcat.compression.ranks import RankConfig

    assert "press Explore first" in list(explore_page.on_calibrated(None, 0.5, "embedded shapes", "", None))[-1][0]
    ex = explore_page.on_explore("embedded", "", None, "", [], 0)[-1]
    updates = list(explore_page.on_calibrated(ex, 0.5, "embedded shapes", "", None))
    assert updates[0][0] == "**loading the images**"
    assert any(u[0].startswith(("**calibrate**", "**allocate**")) and "ETA" in u[0] for u in updates[1:-1]), updates
    text, files = updates[-1]
    assert "calibrated head-level ranks" in text and "of your images" in text and "Predicted KL" in text
    rec = json.loads(Path(files[0]).read_text())
    ranks = RankConfig.load(files[1]).validate(ex.model)  # what compress --ranks takes
    assert ranks.blocks == rec["ranks"]["blocks"] and rec["rule"] == "calibrated"
    assert ", ".join(f"{b['qk']}/{b['vo']}" for b in ranks.blocks) in text

    dense = load_model("embedded")
    small = compress(dense.model, uniform_ranks(dense.model, "head", 0.4))
    folder = save_compressed(replace(dense, model=small), tmp_path / "small")
    zpath = compress_page.zip_model(folder)
    text, fig, files = explore_page.on_compare(ex, str(zpath))
    assert "heads that lost most: layer" in text and "Ranks (QK / VO per layer)" in text
    assert len(fig.data) == 2 and fig.data[0].z.shape == (6, 4)
    csv_rows = Path(next(f for f in files if f.endswith(".csv"))).read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 6 * 4 and any(f.endswith(".png") for f in files)
    assert "press Explore on the dense model first" in explore_page.on_compare(None, str(zpath))[0]
    other = replace(ex, arch_name="vit_tiny_patch16_224")
    assert "not from this vit_tiny_patch16_224" in explore_page.on_compare(other, str(zpath))[0]
    assert "is not a zip" in explore_page.on_compare(ex, str(folder / "comcat.json"))[0]


def test_compress_the_explored_model():
    assert "press Explore" in next(compress_page.on_compress(model_source="model from Explore"))[0]
    ex = explore_page.on_explore("embedded", "", None, "", [], 0)[-1]
    assert ex.spec == "embedded"
    shapes_for_timm = next(compress_page.on_compress(model_source="timm name", name="vit_tiny_patch16_224"))[0]
    assert "embedded shapes only fit the embedded model" in shapes_for_timm


def test_compress_bad_inputs():
    assert (
        "upload a zip"
        in next(compress_page.on_compress(**{**TINY, "data_source": "folder path", "data_path": "/etc"}))[0]
    )
    assert "upload a zip" in next(compress_page.on_compress(**{**TINY, "data_source": "uploaded zip"}))[0]


def test_server_folders_only_inside_the_data_root(tmp_path, monkeypatch):
    import time

    (tmp_path / "root" / "mine").mkdir(parents=True)
    (tmp_path / "root" / "loop").symlink_to(tmp_path / "root")
    (tmp_path / "root" / "out").symlink_to("/")
    monkeypatch.setattr(common, "DATA_ROOT", tmp_path / "root")
    assert common.server_folder("mine", "data folder") == (tmp_path / "root" / "mine").resolve()
    assert (
        common.server_folder(str(tmp_path / "root" / "mine"), "data folder") == (tmp_path / "root" / "mine").resolve()
    )
    for bad in ("/", "/proc", "/etc", "..", "../..", "out", "out/etc", "missing", ""):
        t = time.perf_counter()
        first = next(compress_page.on_compress(**{**TINY, "data_source": "folder path", "data_path": bad}))[0]
        assert "does not exist under the app's data root" in first and time.perf_counter() - t < 1.0, bad
        assert str(tmp_path) not in first  # no server path beyond what was typed


def test_unzip_refuses_unsafe_paths(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside.png", b"x")
    with pytest.raises(Exception, match="unsafe path"):
        common.unzip(str(evil))


def test_zip_bomb_is_refused_before_unpacking(tmp_path, monkeypatch):
    """A zip whose entries unpack to more than the limit (here 1 MB: 3 MB of zeros in a 3 kB zip)."""
    monkeypatch.setattr(common, "MAX_UNZIPPED_MB", 1)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("imgs/a.png", b"\0" * (3 * 2**20))
    assert bomb.stat().st_size < 10_000
    with pytest.raises(Exception, match="bomb.zip unpacks to 3 MB, over the app's limit of 1 MB"):
        common.unzip(str(bomb))
    assert not list(common.WORK.rglob("a.png"))


def test_text_fields_never_reach_server_paths(tmp_path, monkeypatch):
    """The timm-name and pipeline boxes take names and hub IDs, not paths; a folder under the
    operator's data root is the only local pipeline a visitor may name."""
    from comcat.core.errors import ComcatError

    for typed in ("/etc", "../x", "~/.ssh", "a/b/c", "hf-hub:/etc", "hf-hub:../x/y", "local-dir:/etc"):
        out = explore_page.on_explore("timm name", typed, None, "", list(explore_page.PLOT_NAMES), 0)
        assert "is not a timm model name" in out[3] and out[0] is None, typed
    (tmp_path / "org").mkdir()  # an org/name that is also a folder is still read from the hub only
    monkeypatch.chdir(tmp_path)
    assert common.model_spec("timm name", "org/name") == ("hf:org/name", None)
    out = explore_page.on_explore("timm name", "org/name", None, "", list(explore_page.PLOT_NAMES), 0)
    assert "org/name are not on this machine" in out[3] and out[0] is None
    assert common.model_spec("timm name", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k") == (
        "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k",
        None,
    )
    assert common.pipeline_spec(" ") == "embedded"
    assert common.pipeline_spec("runwayml/stable-diffusion-v1-5") == "hub:runwayml/stable-diffusion-v1-5"
    for typed in ("/etc", "/tmp", "..", str(tmp_path)):
        with pytest.raises(ComcatError, match="type 'embedded' or a hub ID"):
            common.pipeline_spec(typed)
    (tmp_path / "root" / "sd").mkdir(parents=True)
    monkeypatch.setattr(common, "DATA_ROOT", tmp_path / "root")
    assert common.pipeline_spec("sd") == str((tmp_path / "root" / "sd").resolve())
    with pytest.raises(ComcatError, match="or a diffusers folder under the app's data root"):
        common.pipeline_spec("/etc")
    status = generate_page.on_generate("/etc", "a V*", None, 1.0, None, 1.0, 0, 2, 1.0, 1)[2]
    assert "type 'embedded' or a hub ID" in status


def test_idle_visitor_folders_expire_without_a_heartbeat_and_busy_ones_stay(monkeypatch):
    """Folders go by age (no heartbeat needed, so API clients are cleaned up too); a visitor whose
    run is going keeps theirs."""

    class Visitor:
        def __init__(self, name):
            self.session_hash = name

    common.visitor(Visitor("idle42"))
    idle = common.workdir("explore")
    common.visitor(Visitor("busy42"))
    busy = common.workdir("compress")
    common.visitor(Visitor("fresh42"))
    fresh = common.workdir("explore")
    old = time.time() - common.SESSION_TTL_S - 10
    for name in ("idle42", "busy42"):
        os.utime(common.WORK / name, (old, old))
    common.BUSY.add("busy42")
    try:
        gone = common.expire_idle()
    finally:
        common.BUSY.discard("busy42")
    assert "idle42" in gone and not idle.exists()
    assert busy.exists() and fresh.exists()
    assert common.expire_idle(now=time.time() + common.SESSION_TTL_S + 10) and not busy.exists()


def test_a_dead_servers_temp_folder_is_removed_at_start(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    theirs = tmp_path / f"{common.WORK_PREFIX}dead"
    (theirs / "visitor" / "uploads").mkdir(parents=True)
    (theirs / common.PID_FILE).write_text(dead.stdout.strip())
    alive = tmp_path / f"{common.WORK_PREFIX}alive"
    alive.mkdir()
    (alive / common.PID_FILE).write_text(str(os.getppid()))
    other = tmp_path / "not-ours"
    other.mkdir()
    assert common.remove_stale_work(tmp_path) == [theirs]
    assert not theirs.exists() and alive.exists() and other.exists()


def test_a_small_zip_bomb_is_refused_by_the_visitors_quota(tmp_path, monkeypatch):
    """A zip of a few kB that unpacks to more than the visitor may hold: refused before unpacking."""
    import zipfile

    from comcat.core.errors import ComcatError

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(4):
            z.writestr(f"photos/{i}.png", b"\0" * (3 * 2**20))
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(common, "VISITOR_QUOTA_MB", 10)

    class Visitor:
        session_hash = "bomber42"

    common.visitor(Visitor())
    with pytest.raises(ComcatError, match="12 MB, and your files here already take .* of the 10 MB each visitor"):
        common.unzip(str(bomb))
    assert common.used_mb(common.WORK / "bomber42") < 0.1  # nothing unpacked: only the (linked) upload
    monkeypatch.setattr(common, "VISITOR_QUOTA_MB", 100)
    monkeypatch.setattr(common, "DISK_QUOTA_MB", common.used_mb(common.WORK) + 5)
    with pytest.raises(ComcatError, match="this server's disk space for visitors is full"):
        common.unzip(str(bomb))
    monkeypatch.setattr(common, "DISK_QUOTA_MB", 10**6)
    folder = common.unzip(str(bomb))
    assert len(list(folder.iterdir())) == 4
    linked = common.take_upload(str(bomb), (".zip",), "zip")
    assert os.stat(linked).st_ino == os.stat(bomb).st_ino  # the upload is not stored twice


def test_generate_keeps_at_most_two_pipelines_keyed_by_what_they_are(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr("app.pipelines.load_pipeline", lambda spec, device: loads.append(spec) or object())
    monkeypatch.setattr("app.pipelines.adapter_names", lambda pipe: [])
    (tmp_path / "root" / "sd").mkdir(parents=True)
    monkeypatch.setattr(common, "DATA_ROOT", tmp_path / "root")
    cache = pipelines.Pipelines(keep=2)
    for typed in ("sd", "./sd", "sd/", "sd/../sd", "embedded", "org/model", "sd"):
        cache.get(typed)
    assert loads == [
        str((tmp_path / "root" / "sd").resolve()),
        "embedded",
        "hub:org/model",
        str((tmp_path / "root" / "sd").resolve()),
    ]
    assert len(cache.cache) == 2


def test_oversized_upload_is_refused_before_copying(tmp_path):
    from app.common import take_upload
    from comcat.core.errors import ComcatError

    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (3 * 2**20))
    with pytest.raises(ComcatError, match="big.zip is 3 MB, over the 2 MB limit of the app"):
        take_upload(str(big), (".zip",), "zip", max_mb=2)
    assert take_upload(str(big), (".zip",), "zip", max_mb=4).stat().st_size == big.stat().st_size


def test_messages_show_no_server_paths(tmp_path, monkeypatch):
    """An error about an uploaded file names the file, one under the data root its path inside it."""
    from comcat.core.errors import ComcatError

    upload = common.WORK / "v1" / "uploads" / "0123456789" / "cats.zip"
    assert (
        common.message(ComcatError(f"cannot read image {upload} (OSError): remove or replace it"))
        == "**Error:** cannot read image cats.zip (OSError): remove or replace it"
    )
    assert (
        common.message(
            ComcatError("m.pth is a bare checkpoint: also pass its architecture, e.g. --arch vit_tiny_patch16_224")
        )
        == "**Error:** m.pth is a bare checkpoint: type its "
        "architecture in the 'architecture' box, e.g. vit_tiny_patch16_224"
    )
    monkeypatch.setattr(common, "DATA_ROOT", tmp_path)
    assert str(tmp_path) not in common.message(OSError(f"no access to {tmp_path}/team/cats/a.png"))
    assert "team/cats/a.png" in common.message(OSError(f"no access to {tmp_path}/team/cats/a.png"))


def test_the_result_card_of_a_model_without_a_classifier_gives_embedding_fidelity():
    report = {
        "dense": {"params": 1000, "flops": 2e6},
        "compressed": {"params": 600, "flops": 1e6, "cosine": 0.987, "retrieval": 93.3, "images": 30},
        "attn_params_ratio": 0.5,
    }
    card = compress_page.result_card(report)
    assert "cosine 0.987 to the dense model's embeddings" in card and "93.3%" in card and "no top-1" in card
    assert "agreement" not in card


def test_explore_takes_a_zipped_transformers_folder(tmp_path):
    """An uploaded zip of a save_pretrained folder: the summary names the family and what is factorized."""
    import transformers as T

    cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=32, patch_size=8, num_labels=3)  # fmt: skip
    T.ViTForImageClassification(cfg).save_pretrained(tmp_path / "my-vit")
    zpath = tmp_path / "my-vit.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in (tmp_path / "my-vit").iterdir():
            z.write(f, f"my-vit/{f.name}")
    out = explore_page.on_explore("uploaded checkpoint", "", str(zpath), "", list(explore_page.PLOT_NAMES), 0)
    assert out[0] is not None, out[3]
    assert "2 layers, width 32, 4 heads of dim 8" in out[3]
    assert "Factorized: transformers encoder (ViTForImageClassification, vit): per-head W^QK_h" in out[3]


def test_compress_a_text_encoder_on_zipped_sentences_or_on_its_weights_alone(tmp_path):
    """A zipped BERT folder (with its tokenizer): on a zip of one sentences file, search and
    fine-tuning run and the card speaks of held-out sentences; with no data it compresses by SVD;
    the embedded model cannot go without its shapes."""
    from compression.test_transformers_models import bert_with_tokenizer, sentences

    folder = bert_with_tokenizer(tmp_path / "bert")
    zips = {}
    for name, files in (("bert", list(folder.iterdir())), ("text", [sentences(tmp_path / "s.txt", 120)])):
        zips[name] = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(zips[name], "w") as z:
            for f in files:
                z.write(f, f"{name}/{f.name}" if name == "bert" else f.name)
    model = dict(model_source="uploaded checkpoint", upload=str(zips["bert"]), arch="", device="cpu", mlp=True)
    updates = list(compress_page.on_compress(**model, data_source="uploaded zip", data_zip=str(zips["text"]),
                                             search=True, search_epochs=1, finetune_epochs=1))  # fmt: skip
    head, _, _, card, *_ = updates[-1]
    assert head.startswith("**Done**"), head
    assert "to the dense model's embeddings**, the same nearest sentence for" in card and "held-out sentences" in card
    head = list(compress_page.on_compress(**model, data_source=common.NO_DATA))[-1][0]
    assert head.startswith("**Done**"), head
    assert "always compresses on its shapes" in next(compress_page.on_compress(data_source=common.NO_DATA))[0]
    # the sentences file itself, not zipped: calibrated and distilled with the padding masked, said on the card
    text = tmp_path / "s.txt"
    head, _, _, card, *_ = list(
        compress_page.on_compress(**model, data_source="uploaded zip", data_zip=str(text), distill_steps=5)
    )[-1]
    assert head.startswith("**Done**"), head
    assert "phases: calibration data" in card and "padding masked" in card and "~~search~~" in card, card
    # Explore's recommendation calibrated on the same sentences
    ex = explore_page.explore("uploaded checkpoint", "", str(zips["bert"]), "")
    advice, files = list(explore_page.on_calibrated(ex, 0.5, "uploaded zip", "", str(text)))[-1]
    assert files and "ranks.json" in " ".join(files) and not advice.startswith("**Error"), advice


def test_an_uploaded_checkpoint_fills_the_architecture_box_with_its_guess(tmp_path):
    from conftest import checkpoint_and_photos

    ckpt, _ = checkpoint_and_photos(tmp_path)
    assert common.guess_arch_box(str(ckpt), "") == "comcat_shapes_vit"
    assert common.guess_arch_box(str(ckpt), "vit_tiny_patch16_224") is not None  # typed: left alone (a skip)
    assert common.guess_arch_box(str(ckpt), "vit_tiny_patch16_224") != "comcat_shapes_vit"
    garbage = tmp_path / "x.safetensors"
    garbage.write_bytes(b"garbage")
    assert common.guess_arch_box(str(garbage), "") != "comcat_shapes_vit"


def test_the_name_box_never_reads_server_folders_and_bad_names_are_one_line(monkeypatch):
    """A name that is also a folder under the app's working directory is looked up on the hub alone
    (same answer as a name that is no folder); hub ids by the hub's rule; overlong names refused."""
    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    assert (ROOT / "assets" / "shapes_swin" / "config.json").is_file()
    answers = []
    for typed in ("assets/shapes_swin", "assets/no_such_folder"):
        out = explore_page.on_explore("timm name", typed, None, "", [], 0)
        assert out[0] is None and out[3].startswith("**Error:**") and "\n" not in out[3]
        answers.append(out[3].replace(typed, "NAME"))
    assert answers[0] == answers[1] and "config.json" not in answers[0]
    for typed, said in (("a/..", "hub id"), ("x" * 300, "at most 200"), ("a" * 120 + "/b", "hub id")):
        out = explore_page.on_explore("timm name", typed, None, "", [], 0)[3]
        assert out.startswith("**Error:**") and said in out and "\n" not in out and "/tmp" not in out, out


def test_a_resumed_runs_clock_counts_its_sessions_not_the_time_it_sat_stopped():
    p = compress_page.Progress()
    p.update({"kind": "phase", "phase": "search"})
    p.update(
        {"kind": "search", "phase": "search", "step": 4, "total": 8, "loss": 1.0, "cost": 1, "target": 1, "tau": 1}
    )
    time.sleep(0.2)
    p.end()
    first = p.elapsed
    time.sleep(0.3)  # stopped: the clock does not run
    assert p.elapsed == first
    p.resumed()
    p.update({"kind": "phase", "phase": "search"})
    time.sleep(0.1)
    p.update(
        {"kind": "search", "phase": "search", "step": 5, "total": 8, "loss": 0.9, "cost": 1, "target": 1, "tau": 1}
    )
    assert first + 0.1 <= p.elapsed < first + 0.3
    assert p.first_step == 4 and p.eta() is not None and p.eta() < 1.0  # 3 steps left at this session's rate
    assert [len(p.losses["search"])] == [2]  # the curve keeps the point from before the Stop


def test_generate_exports_adapter_one_as_a_lora_zip():
    """The example adapter as a kohya LoRA: a zip of the LoRA and the token file, with the fit's
    errors in the status; no adapter chosen is one line."""
    from safetensors.torch import load_file

    from comcat.core.embedded import ASSETS

    example = str(ASSETS / "examples" / "heart_adapter.safetensors")  # it holds a learned token
    *streamed, (archive, status) = generate_page.on_export_lora("embedded", example, "kohya")
    assert streamed[0][1].startswith("**fitting the LoRA**"), streamed
    assert status.startswith("**LoRA written** (kohya") and "W^QK" in status, status
    with zipfile.ZipFile(archive) as z:
        names = sorted(z.namelist())
        z.extractall(Path(archive).parent / "x")
    assert names == ["heart_adapter_kohya_lora.safetensors", "heart_adapter_kohya_lora.token.safetensors"]
    lora = load_file(str(Path(archive).parent / "x" / names[0]))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in lora)
    assert load_file(str(Path(archive).parent / "x" / names[1]))["emb_params"].shape == (1, 64)
    ((archive, status),) = generate_page.on_export_lora("embedded", None, "diffusers")
    assert archive is None and status.startswith("**Error:**") and "choose adapter 1" in status


def test_export_streams_the_fits_progress_and_stop_ends_it_with_nothing_written(monkeypatch):
    """The page shows each attention the fit has done; Stop export ends the library's fit (its
    should_stop) and says nothing was written; Generate waits for the export to end."""
    from comcat.core.embedded import ASSETS
    from comcat.customization.lora_normed import check_stop

    def slow_export(pipe, adapter, fmt, out, control):  # the library's events and stop, paced for a page
        for step in range(1, 1000):
            check_stop(control)
            control.emit({"kind": "lora", "stage": "closed form", "step": step, "total": 1000})
            time.sleep(0.05)
        raise AssertionError("never stopped")

    monkeypatch.setattr(generate_page, "export_adapter", slow_export)
    example = str(ASSETS / "examples" / "heart_adapter.safetensors")
    stream = generate_page.on_export_lora("embedded", example, "diffusers")
    statuses = [next(stream)[1]]
    while "attention" not in statuses[-1]:
        statuses.append(next(stream)[1])
    assert "closed form: attention" in statuses[-1] and "/1000 · ETA" in statuses[-1], statuses
    assert (
        "wait for it, or press Stop export"
        in generate_page.on_generate("embedded", "a V*", None, 1.0, None, 1.0, 0, 2, 1.0, 1)[2]
    )
    assert generate_page.on_export_stop() == common.STOP_REPLIES["stopping"]
    *_, (archive, status) = stream
    assert archive is None and status.startswith("**Stopped**: no LoRA file was written"), status
    assert not generate_page.EXPORT.running and generate_page.on_export_stop() == common.STOP_REPLIES["idle"]
