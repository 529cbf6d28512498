"""The page in a real headless Chromium (Selenium). Skips when chromium is not installed.

Screenshots go to docs/screenshots/ (shown in the README) when COMCAT_SCREENSHOTS=1, else to tmp.
"""

import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from conftest import ROOT  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # minutes: CI runs it with python -m pytest -m slow
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium and chromium-driver are not installed"),
]


@pytest.fixture(scope="module")
def page():
    from app.ui import build_demo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo().queue(default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--window-size=1400,1800",
        "--disable-dev-shm-usage",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.get(f"http://127.0.0.1:{port}/")
    try:
        yield driver
    finally:
        driver.quit()
        demo.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = ROOT / "docs" / "screenshots" if os.environ.get("COMCAT_SCREENSHOTS") else tmp_path_factory.mktemp("shots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def wait(driver, seconds=60):
    return WebDriverWait(driver, seconds, poll_frequency=0.2)


def set_number(driver, elem_id: str, value) -> None:
    """Type into the number box of a gradio Slider/Number with this elem_id."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=number]")
    box.clear()
    box.send_keys(str(value))
    box.send_keys("\t")


def tab(driver, name: str) -> None:
    buttons = lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name]
    wait(driver).until(buttons)[0].click()


def text_of(driver, elem_id: str) -> str:
    return driver.find_element(By.ID, elem_id).text


def finished(driver, elem_id: str, *endings: str, seconds: int = 300) -> str:
    """Wait until the status `elem_id` shows one of `endings` or an error; return its text."""
    wait(driver, seconds).until(lambda d: any(e in text_of(d, elem_id) for e in (*endings, "Error")))
    return text_of(driver, elem_id)


@pytest.fixture(scope="module")
def compressed_zip(tmp_path_factory):
    """The embedded model at 40% head-level ranks, zipped as the Compress tab gives it."""
    from dataclasses import replace

    from app.tabs.compress import zip_model
    from comcat.compression.convert import compress
    from comcat.compression.format import save_compressed
    from comcat.compression.load import load_model
    from comcat.compression.rank_rules import uniform_ranks

    dense = load_model("embedded")
    small = compress(dense.model, uniform_ranks(dense.model, "head", 0.4))
    return zip_model(save_compressed(replace(dense, model=small), tmp_path_factory.mktemp("small") / "small"))


def test_explore_shows_the_heatmap(page, shots, compressed_zip):
    wait(page).until(EC.element_to_be_clickable((By.ID, "explore-go"))).click()
    wait(page).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#explore-heatmap .js-plotly-plot"))
    wait(page).until(lambda d: "head level" in text_of(d, "explore-summary"))
    assert page.find_elements(By.CSS_SELECTOR, "#explore-heatmap .js-plotly-plot .heatmaplayer")
    wait(page).until(lambda d: "structure" in text_of(d, "explore-table") and "qk" in text_of(d, "explore-table"))
    assert "At 50% of the attention parameters" in text_of(page, "explore-recommendation")
    page.save_screenshot(str(shots / "explore.png"))
    page.find_element(By.CSS_SELECTOR, "#explore-adapter button, #explore-adapter .label-wrap").click()
    wait(page).until(EC.element_to_be_clickable((By.ID, "explore-adapter-go"))).click()  # the bundled adapter
    wait(page, 120).until(lambda d: "cross-attention changes" in text_of(d, "explore-adapter-summary"))
    assert "attn2" in text_of(page, "explore-adapter-table")
    page.find_element(By.CSS_SELECTOR, "#explore-calibrate button, #explore-calibrate .label-wrap").click()
    wait(page).until(EC.element_to_be_clickable((By.ID, "explore-calibrate-go"))).click()  # on the shapes
    wait(page, 120).until(lambda d: "calibrated head-level ranks" in text_of(d, "explore-calibrated"))
    assert "Predicted KL to the dense model" in text_of(page, "explore-calibrated")
    page.find_element(By.CSS_SELECTOR, "#explore-compare button, #explore-compare .label-wrap").click()
    upload(page, "explore-compare-zip", compressed_zip)
    page.find_element(By.ID, "explore-compare-go").click()
    wait(page, 60).until(lambda d: "heads that lost most" in text_of(d, "explore-compare-summary"))
    assert page.find_elements(By.CSS_SELECTOR, "#explore-compare .js-plotly-plot .heatmaplayer")
    page.find_element(By.ID, "explore-to-compress").click()  # the diagnosis is one click from Compress
    wait(page).until(lambda d: d.find_element(By.ID, "compress-go").is_displayed())
    wait(page).until(lambda d: checked(d, "compress-model") == "model from Explore")


def checked(driver, elem_id: str) -> str:
    """The selected option of a gradio Radio with this elem_id."""
    return next(
        (
            l.text.strip()
            for l in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} label")
            if l.find_element(By.TAG_NAME, "input").is_selected()
        ),
        "",
    )


def upload(driver, elem_id: str, path) -> None:
    """Give the file input of `elem_id` the file, once it is on the page (an accordion just clicked
    open renders its contents a moment later)."""
    where = (By.CSS_SELECTOR, f"#{elem_id} input[type=file]")
    wait(driver).until(EC.presence_of_element_located(where)).send_keys(str(path))
    try:
        wait(driver, 30).until(
            lambda d: Path(path).stem in d.find_element(By.ID, elem_id).text
        )  # shown as "stem\n.suffix"
    except Exception:
        raise AssertionError(
            f"{elem_id} shows {driver.find_element(By.ID, elem_id).text!r}; page: "
            f"{driver.find_element(By.TAG_NAME, 'body').text[:3000]!r}"
        )


def tiny_settings(page, search_epochs, images):
    tab(page, "Compress")
    wait(page).until(EC.element_to_be_clickable((By.ID, "compress-go")))
    set_number(page, "compress-distill-steps", 10)
    page.find_element(By.CSS_SELECTOR, "#compress-more button, #compress-more .label-wrap").click()
    wait(page).until(lambda d: d.find_element(By.CSS_SELECTOR, "#compress-search-epochs input").is_displayed())
    page.find_element(By.XPATH, "//label[contains(., 'search ranks')]").click()
    set_number(page, "compress-search-epochs", search_epochs)
    set_number(page, "compress-finetune-epochs", 1)
    for elem in ("compress-train-images", "compress-fit-images"):
        set_number(page, elem, images)


def test_tiny_compress_runs_to_completion(page, shots):
    tiny_settings(page, 1, 64)
    page.find_element(By.ID, "compress-go").click()
    wait(page, 10).until(
        lambda d: "starting" in text_of(d, "compress-status") or "step" in text_of(d, "compress-status")
    )
    assert "Done" in (status := finished(page, "compress-status", "Done")), status
    card = text_of(page, "compress-result")
    assert "agreement with the dense model" in card and "top-1" in card and "params" in card
    assert page.find_elements(By.CSS_SELECTOR, "#compress-ranks .js-plotly-plot")
    wait(page).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#compress-losses .js-plotly-plot .scatterlayer .trace")
    )
    page.execute_script("window.scrollTo(0, 0)")  # the status, the ranks and the curves
    page.save_screenshot(str(shots / "compress.png"))


def test_stop_then_resume_finishes_the_run(page, shots):
    """Stopped in the search and resumed: the total time counts both sessions, the ETA of the resumed
    phase is not fooled by the steps done before the Stop, and the loss curve keeps its start."""
    import re
    import time

    def search_step(d):  # (step, total) while the search runs, else None
        m = re.search(r"search\*?\*? · step (\d+)/(\d+)", text_of(d, "compress-status"))
        return m and (int(m.group(1)), int(m.group(2)))

    page.refresh()  # the defaults, whatever the tests before set
    tiny_settings(page, 8, 256)
    started = time.time()
    page.find_element(By.ID, "compress-go").click()
    step, total = wait(page, 120).until(lambda d: (s := search_step(d)) and s[0] >= 3 and s)
    page.find_element(By.ID, "compress-stop").click()  # at once: a fast machine ends the search in seconds
    assert step < total, (step, total)
    assert "Stopped" in (status := finished(page, "compress-status", "Stopped", "Done")), status
    first_session = time.time() - started
    assert "Stopped" in text_of(page, "compress-result") and "--resume" not in text_of(page, "compress-result")
    page.save_screenshot(str(shots / "compress_stopped.png"))
    resumed = time.time()
    page.find_element(By.ID, "compress-resume").click()
    seen = []  # (seconds since Resume, phase, ETA shown)
    while "Done" not in (status := text_of(page, "compress-status")) and time.time() - resumed < 600:
        phase = re.match(r"(\w+)", status)
        eta = re.search(r"ETA (\d+) s", status)
        seen.append((time.time() - resumed, phase and phase.group(1), int(eta.group(1)) if eta else None))
        time.sleep(0.3)
    second_session = time.time() - resumed
    done = float(re.search(r"Done in (\d+) s", text_of(page, "compress-status")).group(1))
    assert done >= 0.9 * (first_session + second_session) - 3, (done, first_session, second_session)
    first = next((t, ph, eta) for t, ph, eta in seen if eta is not None)
    ended = next((t for t, ph, _ in seen if t > first[0] and ph != first[1]), second_session)
    assert first[2] >= 0.3 * (ended - first[0]) - 2, (first, ended)
    xs = page.execute_script(
        "const p = document.querySelector('#compress-losses .js-plotly-plot');"
        "return p ? p.data.flatMap(t => Array.from(t.x)) : [];"
    )
    assert xs and min(xs) < first_session, (min(xs) if xs else None, first_session)  # the curve keeps its start
    assert "agreement with the dense model" in text_of(page, "compress-result")


def test_compress_an_uploaded_checkpoint_on_unlabeled_images(page, tmp_path):
    from conftest import checkpoint_and_photos

    ckpt, zpath = checkpoint_and_photos(tmp_path)
    page.refresh()  # the defaults, whatever the tests before set
    tab(page, "Compress")
    wait(page).until(EC.element_to_be_clickable((By.ID, "compress-go")))
    set_number(page, "compress-distill-steps", 10)
    upload(page, "compress-upload", ckpt)  # uploading picks the source: no radio click
    box = page.find_element(By.CSS_SELECTOR, "#compress-arch textarea, #compress-arch input")
    wait(page).until(lambda d: box.get_attribute("value") == "comcat_shapes_vit")  # guessed from its shapes
    upload(page, "compress-zip", zpath)
    wait(page).until(lambda d: checked(d, "compress-model") == "uploaded checkpoint")
    wait(page).until(lambda d: checked(d, "compress-data") == "uploaded zip")
    page.find_element(By.ID, "compress-go").click()
    assert "Done" in (status := finished(page, "compress-status", "Done", seconds=600)), status
    card = text_of(page, "compress-result")
    assert "agreement with the dense model" in card and "no top-1" in card


def test_tiny_customize_then_generate(page, shots):
    tab(page, "Customize")
    wait(page).until(EC.element_to_be_clickable((By.ID, "customize-go")))
    set_number(page, "customize-steps", 10)
    set_number(page, "customize-preview-every", 10)
    page.find_element(By.ID, "customize-go").click()
    assert "Done" in (status := finished(page, "customize-status", "Done")), status
    assert page.find_elements(By.CSS_SELECTOR, "#customize-previews img")
    page.save_screenshot(str(shots / "customize.png"))
    tab(page, "Generate")
    wait(page).until(EC.element_to_be_clickable((By.ID, "generate-go"))).click()
    assert "image(s)" in (status := finished(page, "generate-status", "image(s)")), status
    assert page.find_elements(By.CSS_SELECTOR, "#generate-adapted img")
    assert page.find_elements(By.CSS_SELECTOR, "#generate-plain img")


def test_generate_with_the_bundled_adapter(page, shots):
    """What a user sees first in Generate: the bundled heart adapter beside the base model, same seeds."""
    page.refresh()
    tab(page, "Generate")
    wait(page).until(EC.element_to_be_clickable((By.ID, "generate-go"))).click()
    assert "image(s)" in (status := finished(page, "generate-status", "image(s)")), status
    adapted = [i.get_attribute("src") for i in page.find_elements(By.CSS_SELECTOR, "#generate-adapted img")]
    plain = [i.get_attribute("src") for i in page.find_elements(By.CSS_SELECTOR, "#generate-plain img")]
    assert adapted and plain and adapted != plain
    page.save_screenshot(str(shots / "generate.png"))


def set_text(driver, elem_id: str, value: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    box.clear()
    box.send_keys(value)
    box.send_keys("\t")


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_customize_generate_and_export_on_today_s_pipelines(page, family, tmp_path, monkeypatch):
    """A tiny random-init SDXL / Flux diffusers folder under the operator's data root: Customize trains
    an adapter on it, Generate uses it, and Export hands over the LoRA (Flux's fitted on the model's
    own inputs, as its attention normalizes q and k)."""
    import sys

    from app import common

    sys.path.insert(0, str(ROOT / "tests" / "customization"))
    import tiny_pipelines

    from comcat.customization.adapter.model import attention_sites

    pipe = getattr(tiny_pipelines, family)()
    pipe.save_pretrained(tmp_path / family)
    sites = len(attention_sites(getattr(pipe, "unet", None) or pipe.transformer))
    monkeypatch.setattr(common, "DATA_ROOT", tmp_path)
    page.refresh()
    tab(page, "Customize")
    wait(page).until(EC.element_to_be_clickable((By.ID, "customize-go")))
    set_text(page, "customize-pipeline", family)
    set_number(page, "customize-steps", 10)
    set_number(page, "customize-preview-every", 0)
    page.find_element(By.ID, "customize-go").click()
    assert "Done" in (status := finished(page, "customize-status", "Done")), status
    assert page.find_elements(By.CSS_SELECTOR, "#customize-adapter a")

    tab(page, "Generate")
    set_text(page, "generate-pipeline", family)
    set_number(page, "generate-steps", 5)
    set_number(page, "generate-n", 1)
    wait(page).until(EC.element_to_be_clickable((By.ID, "generate-go"))).click()
    assert "image(s)" in (status := finished(page, "generate-status", "image(s)")), status
    assert len(page.find_elements(By.CSS_SELECTOR, "#generate-adapted img")) == 1
    page.find_element(By.ID, "generate-export").click()
    status = finished(page, "generate-status", "LoRA written")
    assert f"on {sites} attentions" in status, status  # the tiny folder's, not the embedded model's
    if family == "flux":  # its q/k-normed attention is fitted on the model's own inputs
        assert "normalize q and k" in status and "Traceback" not in page.page_source, status
    assert page.find_elements(By.CSS_SELECTOR, "#generate-lora a")
