"""The architecture, checked: every import (function-level ones too) goes from a module to one
listed before it in LAYERS, so there is no cycle and no climb back up; core imports only core,
and the compression and customization sides never import each other."""

import ast
from pathlib import Path

from conftest import ROOT

LAYERS = [
    # core: shared by both sides
    "comcat.core",
    "comcat.core.errors",
    "comcat.core.records",
    "comcat.core.shapes",
    "comcat.core.linalg",
    "comcat.core.images",
    "comcat.core.files",
    "comcat.core.dist",
    "comcat.core.loop",
    "comcat.core.embedded",
    # the compression side
    "comcat.compression",
    "comcat.compression.families.base",
    "comcat.compression.families.qk_maps",
    "comcat.compression.families.timm_vit",
    "comcat.compression.families.timm_eva",
    "comcat.compression.families.timm_swin",
    "comcat.compression.families.hf_encoders",
    "comcat.compression.families",
    "comcat.compression.hub",
    "comcat.compression.models",
    "comcat.compression.analysis",
    "comcat.compression.ranks",
    "comcat.compression.lowrank",
    "comcat.compression.neurons",
    "comcat.compression.convert",
    "comcat.compression.cost",
    "comcat.compression.rank_rules",
    "comcat.compression.quantize",
    "comcat.compression.format",
    "comcat.compression.load",
    "comcat.compression.images",
    "comcat.compression.splits",
    "comcat.compression.texts",
    "comcat.compression.evaluate",
    "comcat.compression.calibrate",
    "comcat.compression.allocate",
    "comcat.compression.distill",
    "comcat.compression.reconstruct",
    "comcat.compression.search",
    "comcat.compression.diagnose",
    "comcat.compression.report",
    "comcat.compression.plots",
    "comcat.compression.job",
    "comcat.compression.export",
    # the customization side
    "comcat.customization",
    "comcat.customization.adapter.config",
    "comcat.customization.adapter.layer",
    "comcat.customization.adapter.lora",
    "comcat.customization.adapter.joint",
    "comcat.customization.adapter.flux",
    "comcat.customization.adapter.model",
    "comcat.customization.adapter",
    "comcat.customization.adapter.inspect",
    "comcat.customization.diffusion",
    "comcat.customization.diffusion.shapes_t2i",
    "comcat.customization.diffusion.pipeline",
    "comcat.customization.diffusion.concept",
    "comcat.customization.diffusion.denoisers",
    "comcat.customization.diffusion.judge",
    "comcat.customization.diffusion.quality",
    "comcat.customization.customize",
    "comcat.customization.generate",
    "comcat.customization.lora_normed",
    "comcat.customization.lora_export",
    # the command line, then the app
    "comcat",
    "comcat.cli",
    "comcat.__main__",
    "app",
    "app.serve",
    "app.common",
    "app.runner",
    "app.pipelines",
    "app.tabs",
    "app.tabs.explore",
    "app.tabs.compress",
    "app.tabs.customize",
    "app.tabs.generate",
    "app.ui",
]
SIDES = ("comcat.core", "comcat.compression", "comcat.customization")


def modules() -> dict[str, Path]:
    found = {}
    for package in ("comcat", "app"):
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The comcat / app modules `name` imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != name}


def side(name: str) -> str | None:
    return next((s for s in SIDES if name == s or name.startswith(s + ".")), None)


def test_every_module_has_a_place_in_the_layers():
    assert sorted(modules()) == sorted(LAYERS), "add new modules to LAYERS (and remove deleted ones)"


def test_imports_only_go_down_and_the_two_sides_stay_apart():
    found = modules()
    rank = {m: i for i, m in enumerate(LAYERS)}
    up, across = [], []
    for name, path in found.items():
        for target in imports(name, path, set(found)):
            if rank[target] >= rank[name]:
                up.append(f"{name} -> {target}")
            s, t = side(name), side(target)
            if s is not None and t is not None and s != t and t != "comcat.core":
                across.append(f"{name} -> {target}")
    assert not up, f"imports up the layers: {up}"
    assert not across, f"imports across the sides: {across}"


def test_the_check_sees_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    from . import c\n")
    found = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py", "pkg.c": pkg / "c.py"}
    assert imports("pkg.a", pkg / "a.py", set(found)) == {"pkg.b", "pkg.c"}
