"""The app as a shared server, run as its own process and driven by several gradio_client sessions:
each visitor sees only their own results, hostile uploads are one line, memory stays bounded."""

import json
import shutil
import threading
import time
import zipfile

import pytest

pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from app.serve import AppServer  # noqa: E402

EXPLORE = ("embedded", "", None, "", ["W^QK per head", "W^VO per head"], 0, 0.5)


@pytest.fixture(scope="module")
def server():
    with AppServer() as s:
        yield s


def _compress(client, ratio):
    """A tiny compress run of the embedded model at `ratio` of the attention parameters."""
    args = ["embedded", "", None, "", ratio, "params", "head", False, False, 1, 2, 0]
    args += ["embedded shapes", "", None, "cpu", 64, 64, "attention only", False, False]
    return client.submit(*args, api_name="/on_compress")


def _wait_until_streaming(job, timeout=120):
    """Block until `job` has streamed its first update (its run holds the runner), or has ended."""
    deadline = time.monotonic() + timeout
    while not job.outputs() and not job.done():
        assert time.monotonic() < deadline, "the first run never started"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_visitors_compressing_at_once_each_see_only_their_own_card_and_file(server, tmp_path):
    """A's run goes; B presses Compress again and again (refused while A's runs, then B's own run
    starts the moment A's ends): A's card and A's zip are A's, B's are B's."""
    alice, bob = Client(server.url, verbose=False), Client(server.url, verbose=False)
    first = _compress(alice, 0.5)
    _wait_until_streaming(first)
    bobs, stop = [], threading.Event()

    def press():
        while not stop.is_set():
            bobs.append(_compress(bob, 0.9))
            bobs[-1].result()

    presser = threading.Thread(target=press)
    presser.start()
    status, _, _, card, download, _ = first.result()
    stop.set()
    presser.join(300)
    assert status.startswith("**Done**") and "attention at 50%" in card and "90%" not in card, card
    with zipfile.ZipFile(download) as z:
        meta = json.loads(z.read("comcat.json"))
    assert meta["report"]["attn_params_ratio"] == pytest.approx(0.5, abs=0.03)
    finished = [b.result() for b in bobs if b.result()[0].startswith("**Done**")]
    busy = [b.result() for b in bobs if "already running" in b.result()[0]]
    assert busy, "B was never refused while A's run went"
    for status, _, _, card, download, _ in finished:
        assert "attention at 90%" in card
        with zipfile.ZipFile(download) as z:
            assert json.loads(z.read("comcat.json"))["report"]["attn_params_ratio"] == pytest.approx(0.9, abs=0.03)


@pytest.mark.slow
def test_server_memory_stays_flat_over_repeated_explore_calls(server):
    """40 Explore calls, each from a new session (as API clients come): no growth once warm."""
    rss = []
    for i in range(40):
        Client(server.url, verbose=False).predict(*EXPLORE, api_name="/on_explore")
        rss.append(server.rss_mb())
    assert rss[-1] - rss[19] < 80, f"RSS after call 20: {rss[19]:.0f} MB, after call 40: {rss[-1]:.0f} MB"


def test_a_lying_comcat_json_in_an_uploaded_zip_is_one_line_and_memory_stays_bounded(server, tmp_path):
    from comcat.compression.convert import compress
    from comcat.compression.format import save_compressed
    from comcat.compression.load import load_model
    from comcat.compression.models import Loaded
    from comcat.compression.rank_rules import uniform_ranks

    dense = load_model("embedded")
    folder = save_compressed(
        Loaded(compress(dense.model, uniform_ranks(dense.model, "head", 0.5)), dense.arch), tmp_path / "small"
    )
    meta = json.loads((folder / "comcat.json").read_text())
    meta["arch_kwargs"]["num_classes"] = 100_000_000  # 25 GB of classifier that the weights do not hold
    (folder / "comcat.json").write_text(json.dumps(meta))
    archive = shutil.make_archive(str(tmp_path / "small"), "zip", folder)
    out = Client(server.url, verbose=False).predict(
        "uploaded checkpoint", "", handle_file(archive), "", [], 0, 0.5, api_name="/on_explore"
    )
    assert out[3].startswith("**Error:**") and "describes a model of" in out[3] and "\n" not in out[3], out[3]
    assert "/tmp" not in out[3]
    assert server.rss_mb() < 2048
