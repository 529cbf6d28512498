"""The Customize and Generate tabs' handlers called directly."""

import shutil

import pytest

gr = pytest.importorskip("gradio")

from app import pipelines  # noqa: E402
from app.tabs import customize as customize_page  # noqa: E402
from app.tabs import explore as explore_page  # noqa: E402
from app.tabs import generate as generate_page  # noqa: E402
from conftest import ROOT  # noqa: E402

HEARTS = ROOT / "assets" / "examples" / "heart"
TINY = dict(pipeline="embedded", uploads=None, prompt="a V*", token="V*", rank=1, steps=6, lr=2.5e-3, preview_every=3)


def test_customize_streams_loss_and_previews_then_offers_the_adapter():
    updates = list(customize_page.on_customize(**TINY))
    assert any("step" in str(u[0]) and "loss" in str(u[0]) for u in updates)
    status, losses, gallery, adapter, run_dir = updates[-1]
    assert status.startswith("**Done**") and "6 steps" in status and "KB" in status
    assert len(losses.data[0].x) == 6
    hearts = sorted(HEARTS.glob("*.png"))  # the bundled concept, shown first, then every preview
    assert [c for _, c in gallery] == [f"concept image: {h.name}" for h in hearts] + ["step 3 · a V*"] * 4 + [
        "step 6 · a V*"
    ] * 4
    assert len(losses.data) == 2 and losses.data[1].name == "smoothed"
    assert adapter.endswith("adapter.safetensors")
    # the Generate tab uses it: with and without, same seeds, different images
    adapted, plain, msg = generate_page.on_generate("embedded", "a V* in blue", adapter, 1.0, None, 1.0, 0, 4, 4.0, 2)
    assert msg.startswith("**Done**") and len(adapted) == len(plain) == 2
    import numpy as np

    assert any(np.abs(np.asarray(a, float) - np.asarray(b, float)).max() > 0 for a, b in zip(adapted, plain))


def test_customize_stop_then_resume_finishes_the_run():
    run = customize_page.on_customize(**{**TINY, "steps": 400, "preview_every": 0})
    run_dir = None
    for update in run:
        run_dir = update[4] if isinstance(update[4], str) else run_dir
        if "step" in str(update[0]):
            assert customize_page.on_customize_stop().startswith("**stopping**")
            break
    final = list(run)[-1]
    assert final[0].startswith("**Stopped** at step") and final[3].endswith("adapter.safetensors")
    busy_free = customize_page.on_customize_stop()
    assert busy_free == "nothing is running"
    # resume the same folder, with fewer remaining steps by editing nothing: it continues to 400
    import json
    from pathlib import Path

    run_file = Path(run_dir) / "customize.json"
    state = json.loads(run_file.read_text())
    state["spec"]["steps"] = state["step"] + 2  # keep the test short: two more steps
    run_file.write_text(json.dumps(state))
    resumed = list(customize_page.on_resume(run_dir))[-1]
    assert resumed[0].startswith("**Done**") and f"{state['step'] + 2} steps" in resumed[0]
    assert list(resumed[1].data[0].x) == list(range(1, state["step"] + 3))  # the loss curve goes on


def test_customize_bad_inputs_are_one_line(tmp_path):
    few = [str(p) for p in sorted(HEARTS.glob("*.png"))[:2]]
    assert "upload 3-10 images" in next(customize_page.on_customize(**{**TINY, "uploads": few}))[0]
    junk = tmp_path / "a.exe"
    junk.write_bytes(b"MZ")
    many = [str(p) for p in sorted(HEARTS.glob("*.png"))] + [str(junk)]
    msg = next(customize_page.on_customize(**{**TINY, "uploads": many}))[0]
    assert "a.exe is not a image or .txt caption" in msg and "\n" not in msg
    assert (
        "does not contain the concept token"
        in next(customize_page.on_customize(**{**TINY, "prompt": "a heart", "uploads": _plain(tmp_path)}))[0]
    )
    assert "nothing to resume" in next(customize_page.on_resume(None))[0]
    _, _, msg = generate_page.on_generate("embedded", "", None, 1.0, None, 1.0, 0, 4, 4.0, 1)
    assert "prompt is empty" in msg
    _, _, msg = generate_page.on_generate("embedded", "a red star", str(junk), 1.0, None, 1.0, 0, 4, 4.0, 1)
    assert msg.startswith("**Error:**") and "adapter file" in msg


def test_uploaded_images_are_copied_into_the_apps_folder(tmp_path):
    uploads = _plain(tmp_path)
    folder = customize_page.concept_folder(uploads)
    assert folder.is_relative_to(customize_page.workdir("x").parent.parent)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.split("/")[-1] for p in uploads)


def _plain(tmp_path):
    out = []
    for p in sorted(HEARTS.glob("*.png"))[:4]:
        shutil.copy(p, tmp_path / p.name)
        out.append(str(tmp_path / p.name))
    return out


def test_explore_inspects_an_adapter_against_its_base():
    summary, table, csv_path = explore_page.on_inspect_adapter("embedded", str(pipelines.EXAMPLE_ADAPTER))
    assert "cross-attention changes W^QK by" in summary and len(table) == 14
    assert table[0][1] in ("self", "cross") and all(0 < row[4] <= row[5] for row in table)
    from pathlib import Path

    assert Path(csv_path).read_text().startswith("site,kind,heads,rank,qk_change_mean")
    assert (
        explore_page.on_inspect_adapter("embedded", None)[0] == "**Error:** upload an adapter file (.safetensors) first"
    )
    assert "type 'embedded' or a hub ID" in explore_page.on_inspect_adapter("/etc", str(pipelines.EXAMPLE_ADAPTER))[0]


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_customize_and_generate_take_a_pipeline_folder_of_today_s_families(family, tmp_path, monkeypatch):
    """A diffusers folder under the operator's data root (a tiny random-init SDXL / SD3 pipeline)
    trains in Customize and generates with its adapter in Generate."""
    import sys

    from app import common

    sys.path.insert(0, str(ROOT / "tests" / "customization"))
    import tiny_pipelines

    getattr(tiny_pipelines, family)().save_pretrained(tmp_path / "root" / family)
    monkeypatch.setattr(common, "DATA_ROOT", tmp_path / "root")
    updates = list(customize_page.on_customize(**{**TINY, "pipeline": family, "steps": 3, "preview_every": 0}))
    status, _, _, adapter, _ = updates[-1]
    assert status.startswith("**Done**") and adapter.endswith("adapter.safetensors"), status
    adapted, plain, msg = generate_page.on_generate(family, "a V*", adapter, 1.0, None, 1.0, 0, 2, 4.0, 1)
    assert msg.startswith("**Done**") and len(adapted) == len(plain) == 1, msg
