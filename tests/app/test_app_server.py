"""The app launched on a local port and driven through gradio_client."""

import socket

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client():
    from app.ui import build_demo

    demo = build_demo().queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def test_explore_through_the_api(client):
    heat, heads, curves, summary, files, table, advice, layer = client.predict(
        "embedded", "", None, "", ["W^QK per head", "W^VO per head"], 0, 0.5, api_name="/on_explore"
    )
    assert "head level" in summary and "embedded" in summary
    assert heat is not None and len(files) == 4 and len(table["data"]) == 36 and "0.84× dense" in advice


def test_bad_input_through_the_api_is_a_message(client):
    out = client.predict("timm name", "no_such_model_xyz", None, "", [], 0, 0.5, api_name="/on_explore")
    assert out[3].startswith("**Error:**") and "\n" not in out[3]


@pytest.mark.slow
def test_tiny_compress_through_the_api(client):
    job = client.submit(
        "embedded",
        "",
        None,
        "",
        0.5,
        "params",
        "head",
        False,
        True,
        1,
        3,
        0,
        "embedded shapes",
        "",
        None,
        "cpu",
        64,
        64,
        "attention only",
        False,
        False,
        api_name="/on_compress",
    )
    outputs = job.result()
    status, _, _, card, download, _ = outputs
    assert status.startswith("**Done**") and "top-1" in card and "agreement" in card and download.endswith(".zip")
    assert client.predict(api_name="/on_stop") == "nothing is running"


def test_tiny_customize_through_the_api(client):
    job = client.submit("embedded", None, "a V*", "V*", 1, 10, 2.5e-3, 0, api_name="/on_customize")
    status, _, _, adapter = job.result()
    assert status.startswith("**Done**") and adapter.endswith(".safetensors")
    assert client.predict(api_name="/on_customize_stop") == "nothing is running"


def test_app_options_below_one_are_refused_in_one_line():
    import subprocess
    import sys

    from conftest import ROOT

    for flag in ("--sessions", "--idle-minutes", "--visitor-quota-mb"):
        r = subprocess.run([sys.executable, "app.py", flag, "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--sessions must be at least 1" in r.stderr.splitlines()[-1], r.stderr
