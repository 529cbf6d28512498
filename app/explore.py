"""Explore tab: spectra of a model's attention, as interactive plots, a summary and exports."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from comcat.analysis import Spectra, analyze
from comcat.diagnose import (COLUMNS, calibrate_on, comparison_text, error_grid, head_errors, layer_table, recommend,
                             recommendation_text, table_summary, to_csv)
from comcat.errors import ComcatError
from comcat.models import CHECKPOINT_SUFFIXES, load_model
from comcat.plots import (ALL, energy_heatmaps_mpl, energy_heatmaps_plotly, head_errors_mpl, head_errors_plotly,
                          head_spectra_plotly, param_curves_mpl, param_curves_plotly, save_png)

from .common import public_text, take_upload, unzip, workdir

SOURCES = ("embedded", "timm name", "uploaded checkpoint")


def model_spec(source: str, name: str = "", upload: str | None = None, arch: str = "") -> tuple[str, str | None]:
    """(SPEC, arch) of the model a user picked, as comcat.load_model takes them; an upload is first
    copied into the app's folder."""
    if source == "embedded":
        return "embedded", None
    if source == "timm name":
        name = name.strip() or "deit_small_patch16_224"
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise ComcatError(f"{name!r} is not a timm model name: type one like vit_tiny_patch16_224, or choose "
                              "'uploaded checkpoint' for a file")
        return "timm:" + name, None
    if source != "uploaded checkpoint":
        raise ComcatError(f"unknown model source {source!r}")
    path = take_upload(upload, CHECKPOINT_SUFFIXES, "checkpoint")
    if not arch.strip():
        raise ComcatError(f"{path.name} is a bare checkpoint: type its architecture in the 'architecture' box, "
                          "e.g. vit_tiny_patch16_224")
    return str(path), arch.strip()


@dataclass
class Exploration:
    source: str
    spectra: Spectra
    spec: str = "embedded"            # what load_model(spec, arch) takes to load the model again
    arch: str | None = None
    table: list = field(default_factory=list)     # diagnose.layer_table rows
    model: object = None                          # the dense model (for recommendations at other budgets)
    arch_name: str = ""                           # its architecture, as a compressed model's comcat.json names it
    arch_kwargs: dict = field(default_factory=dict)

    def recommendation(self, ratio: float) -> str:
        return recommendation_text(recommend(self.model, float(ratio), self.spectra))

    def calibrated_recommendation(self, ratio: float, data: str | None, progress=None) -> tuple[str, list[str]]:
        """(text, exports) of the recommendation at `ratio` allocated by the errors measured on the
        images of `data` (a folder; None: the embedded shapes, for the embedded model only); the
        exports are its JSON and its ranks as a rank file (compress --ranks)."""
        if data is None and self.spec != "embedded":
            raise ComcatError("the embedded shapes only fit the embedded model: choose 'folder path' or 'uploaded "
                              "zip' and give images of your own (labels are not needed)")
        cal = calibrate_on(self.model, data, progress=progress and (lambda i, n: progress(i, n, "calibrate")))
        rec = recommend(self.model, float(ratio), self.spectra, cal,
                        progress=progress and (lambda i, n: progress(i, n, "allocate")))
        out = workdir("explore")
        (out / "recommendation.json").write_text(json.dumps(rec, indent=1))
        (out / "ranks.json").write_text(json.dumps(rec["ranks"], indent=1))     # a rank file: compress --ranks
        return recommendation_text(rec), [str(out / "recommendation.json"), str(out / "ranks.json")]

    def compare(self, upload: str | None) -> tuple[str, object, list[str]]:
        """(text, plotly figure, exports) of a compressed model (an uploaded zip of its folder, as
        Compress gives it) against this dense model: the per-head error of its W^QK_h, W^VO_h."""
        from comcat.io import load_compressed

        folder = unzip(upload, "zip of a compressed model (the one Compress gives)", "compressed")
        small = load_compressed(folder)
        name = public_text(str(folder))
        if (small.arch, small.arch_kwargs) != (self.arch_name, self.arch_kwargs):
            raise ComcatError(f"{name} was compressed from a {small.arch} model, not from this {self.arch_name}: "
                              "explore its dense source first")
        rows = head_errors(self.model, small.model)
        grid = error_grid(rows)
        out = workdir("explore")
        (out / "head_errors.csv").write_text("layer,head,product,error\n" + "".join(
            f"{r['layer']},{r['head']},{r['product']},{r['error']:.6f}\n" for r in rows))
        files = [str(out / "head_errors.csv")]
        if rows:
            files.append(str(save_png(head_errors_mpl(grid), out / "head_errors.png")))
        return comparison_text(rows, small.meta.get("ranks")), head_errors_plotly(grid) if rows else None, files

    def figures(self, names=ALL, layer: int = 0):
        """(energy heatmaps, per-head spectra of `layer`, param curves) as plotly figures."""
        names = [n for n in ALL if n in names] or list(ALL)
        layer = max(0, min(int(layer), self.spectra.depth - 1))
        return (energy_heatmaps_plotly(self.spectra, names), head_spectra_plotly(self.spectra, layer),
                param_curves_plotly(self.spectra))

    def summary(self) -> str:
        s = self.spectra
        return (f"**{self.source}**: {s.depth} layers, width {s.dim}, {s.num_heads} heads of dim {s.head_dim}.\n\n"
                + " ".join(s.summary(e) for e in (0.9, 0.99))
                + (f"\n\n{table_summary(self.table)}" if self.table else ""))

    def table_rows(self) -> list[list]:
        """The layer table for the page: one row per layer and site, numbers rounded."""
        return [[r[c] if isinstance(r[c], (int, str)) else round(r[c], 2) for c in COLUMNS] for r in self.table]

    def export(self) -> list[str]:
        """spectra.json + layers.csv + energy_heatmaps.png + param_curves.png in a fresh folder; returns the paths."""
        out = workdir("explore")
        (out / "spectra.json").write_text(json.dumps({"source": self.source, **self.spectra.to_dict()}))
        (out / "layers.csv").write_text(to_csv(self.table))
        pngs = [save_png(energy_heatmaps_mpl(self.spectra), out / "energy_heatmaps.png"),
                save_png(param_curves_mpl(self.spectra), out / "param_curves.png")]
        return [str(out / "spectra.json"), str(out / "layers.csv")] + [str(p) for p in pngs]


def explore(source: str, name: str = "", upload: str | None = None, arch: str = "") -> Exploration:
    spec, arch_name = model_spec(source, name, upload, arch)
    loaded = load_model(spec, arch_name)
    if loaded.compressed:
        raise ComcatError(f"{loaded.source} is already compressed: explore the dense model it came from, then "
                          "compare the compressed one with it under 'a compressed model against this one'")
    return Exploration(public_text(loaded.source), analyze(loaded.model), spec, arch_name, layer_table(loaded.model),
                       loaded.model, loaded.arch, loaded.arch_kwargs)
