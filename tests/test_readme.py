"""The README's Python examples run as written, from any folder (not only the repository root)."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_python_examples_run(tmp_path):
    """Both blocks in one interpreter, one after the other, as a user pasting them would."""
    blocks = python_blocks()
    assert len(blocks) == 2
    code = "\n".join(blocks).replace('"small/"', repr(str(tmp_path / "small")))  # write under tmp, not the repo
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, f"README python blocks: {out.stderr[-2000:]}"
    assert (tmp_path / "small" / "comcat.json").is_file()
