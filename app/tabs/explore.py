"""Explore tab: spectra of a model's attention, its diagnosis and recommendations, a compressed
model and an adapter against their base; plots, tables and exports."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import gradio as gr

from comcat.compression import families
from comcat.compression.analysis import Spectra, analyze
from comcat.compression.diagnose import (
    COLUMN_HELP,
    COLUMNS,
    calibrate_on,
    comparison_text,
    error_grid,
    head_errors,
    layer_table,
    recommend,
    recommendation_text,
    table_summary,
    to_csv,
)
from comcat.compression.load import load_model
from comcat.compression.plots import (
    ALL,
    energy_heatmaps_mpl,
    energy_heatmaps_plotly,
    head_errors_mpl,
    head_errors_plotly,
    head_spectra_plotly,
    param_curves_mpl,
    param_curves_plotly,
    save_png,
)
from comcat.core.errors import ComcatError

from .. import common
from ..common import SOURCES, follow_typing, message, model_inputs, model_spec, public_text, unzip, visitor, workdir
from ..pipelines import EXAMPLE_ADAPTER, PIPELINES, adapter_file
from ..runner import Runner

# the two most recently explored dense models, shared by all visitors: a visitor's state holds how
# to load a model, not the model, so the server's memory does not grow with visitors
DENSE = common.Recent(keep=2)
RECOMMEND = Runner("recommendation")  # one calibrated recommendation at a time, streamed to its page


@dataclass
class Exploration:
    source: str
    spectra: Spectra
    spec: str = "embedded"  # what load_model(spec, arch) takes to load the model again
    arch: str | None = None
    table: list = field(default_factory=list)  # diagnose.layer_table rows
    arch_name: str = ""  # its architecture, as a compressed model's comcat.json names it
    arch_kwargs: dict = field(default_factory=dict)

    @property
    def model(self):
        """The dense model (for recommendations at other budgets): from DENSE, loaded again if gone."""
        return DENSE.get((self.spec, self.arch), lambda: load_model(self.spec, self.arch).model)

    def recommendation(self, ratio: float) -> str:
        return recommendation_text(recommend(self.model, float(ratio), self.spectra))

    def calibrated_recommendation(self, ratio: float, data: str | None, progress=None) -> tuple[str, list[str]]:
        """(text, exports) of the recommendation at `ratio` allocated by the errors measured on the
        images of `data` (a folder; None: the embedded shapes, for the embedded model only); the
        exports are its JSON and its ranks as a rank file (compress --ranks)."""
        if data is None and self.spec != "embedded":
            raise ComcatError(
                "the embedded shapes only fit the embedded model: choose 'folder path' or 'uploaded "
                "zip' and give images of your own (labels are not needed)"
            )
        cal = calibrate_on(self.model, data, progress=progress and (lambda i, n: progress(i, n, "calibrate")))
        rec = recommend(
            self.model, float(ratio), self.spectra, cal, progress=progress and (lambda i, n: progress(i, n, "allocate"))
        )
        out = workdir("explore")
        (out / "recommendation.json").write_text(json.dumps(rec, indent=1))
        (out / "ranks.json").write_text(json.dumps(rec["ranks"], indent=1))  # a rank file: compress --ranks
        return recommendation_text(rec), [str(out / "recommendation.json"), str(out / "ranks.json")]

    def compare(self, upload: str | None) -> tuple[str, object, list[str]]:
        """(text, plotly figure, exports) of a compressed model (an uploaded zip of its folder, as
        Compress gives it) against this dense model: the per-head error of its W^QK_h, W^VO_h."""
        from comcat.compression.format import load_compressed

        folder = unzip(upload, "zip of a compressed model (the one Compress gives)", "compressed")
        small = load_compressed(folder)
        name = public_text(str(folder))
        if (small.arch, small.arch_kwargs) != (self.arch_name, self.arch_kwargs):
            raise ComcatError(
                f"{name} was compressed from a {small.arch} model, not from this {self.arch_name}: "
                "explore its dense source first"
            )
        rows = head_errors(self.model, small.model)
        grid = error_grid(rows)
        out = workdir("explore")
        (out / "head_errors.csv").write_text(
            "layer,head,product,error\n"
            + "".join(f"{r['layer']},{r['head']},{r['product']},{r['error']:.6f}\n" for r in rows)
        )
        files = [str(out / "head_errors.csv")]
        if rows:
            files.append(str(save_png(head_errors_mpl(grid), out / "head_errors.png")))
        return comparison_text(rows, small.meta.get("ranks")), head_errors_plotly(grid) if rows else None, files

    def figures(self, names=ALL, layer: int = 0):
        """(energy heatmaps, per-head spectra of `layer`, param curves) as plotly figures."""
        names = [n for n in ALL if n in names] or list(ALL)
        layer = max(0, min(int(layer), self.spectra.depth - 1))
        return (
            energy_heatmaps_plotly(self.spectra, names),
            head_spectra_plotly(self.spectra, layer),
            param_curves_plotly(self.spectra),
        )

    def summary(self) -> str:
        s = self.spectra
        return (
            f"**{self.source}**: {s.depth} layers, width {s.dim}, {s.num_heads} heads of dim {s.head_dim}. "
            f"Factorized: {families.describe(self.model)}.\n\n"
            + " ".join(s.summary(e) for e in (0.9, 0.99))
            + (f"\n\n{table_summary(self.table)}" if self.table else "")
        )

    def table_rows(self) -> list[list]:
        """The layer table for the page: one row per layer and site, numbers rounded."""
        return [[r[c] if isinstance(r[c], (int, str)) else round(r[c], 2) for c in COLUMNS] for r in self.table]

    def export(self) -> list[str]:
        """spectra.json + layers.csv + energy_heatmaps.png + param_curves.png in a fresh folder; returns the paths."""
        out = workdir("explore")
        (out / "spectra.json").write_text(json.dumps({"source": self.source, **self.spectra.to_dict()}))
        (out / "layers.csv").write_text(to_csv(self.table))
        pngs = [
            save_png(energy_heatmaps_mpl(self.spectra), out / "energy_heatmaps.png"),
            save_png(param_curves_mpl(self.spectra), out / "param_curves.png"),
        ]
        return [str(out / "spectra.json"), str(out / "layers.csv")] + [str(p) for p in pngs]


def explore(source: str, name: str = "", upload: str | None = None, arch: str = "") -> Exploration:
    spec, arch_name = model_spec(source, name, upload, arch)
    loaded = load_model(spec, arch_name)
    if loaded.compressed:
        raise ComcatError(
            f"{loaded.source} is already compressed: explore the dense model it came from, then "
            "compare the compressed one with it under 'a compressed model against this one'"
        )
    DENSE.put((spec, arch_name), loaded.model)
    return Exploration(
        public_text(loaded.source),
        analyze(loaded.model),
        spec,
        arch_name,
        layer_table(loaded.model),
        loaded.arch,
        loaded.arch_kwargs,
    )


SHORT = {  # the table's headers: short enough to fit without scrolling
    "stable_rank": "stable",
    "effective_rank": "effective",
    "random_effective_rank": "shuffled eff.",
}
PLOT_NAMES = {"W^Q": "q", "W^K": "k", "W^V": "v", "W^O": "o", "W^QK per head": "qk", "W^VO per head": "vo"}


def on_explore(source, name, upload, arch, shown, layer, budget=0.5, request: gr.Request = None):
    """-> heatmaps, head spectra, param curves, summary, exports, layer table, recommendation at
    `budget`, the layer slider's range, state."""
    visitor(request)
    try:
        ex = explore(source, name, upload, arch)
        layer = min(int(layer), ex.spectra.depth - 1)
        figs = ex.figures([PLOT_NAMES[s] for s in shown], layer)
        slider = gr.update(maximum=ex.spectra.depth - 1, value=layer)  # the loaded model's layers
        return (*figs, ex.summary(), ex.export(), ex.table_rows(), ex.recommendation(budget), slider, ex)
    except Exception as e:  # noqa: BLE001 - shown in the page
        return None, None, None, message(e), None, None, None, gr.skip(), None


ADAPTER_COLUMNS = (
    "site",
    "kind",
    "heads",
    "rank",
    "QK change mean",
    "QK change max",
    "VO change mean",
    "VO change max",
    "QK update s1",
    "VO update s1",
)


def on_inspect_adapter(pipeline, upload, request: gr.Request = None):
    """-> (summary, table rows, CSV file) of an adapter's per-head updates against its base pipeline."""
    from comcat.customization.adapter.inspect import adapter_summary, adapter_table, to_csv

    visitor(request)
    try:
        path = adapter_file(upload)
        if path is None:
            raise ComcatError("upload an adapter file (.safetensors) first")
        rows = adapter_table(PIPELINES.get(pipeline), path)
        out = workdir("explore") / f"{path.stem}_updates.csv"
        out.write_text(to_csv(rows))
        table = [
            [r["site"], r["kind"], r["heads"], r["rank"]]
            + [round(r[k], 3) for k in ("qk_change_mean", "qk_change_max", "vo_change_mean", "vo_change_max")]
            + [round(r["qk_update_sv"][0], 3), round(r["vo_update_sv"][0], 3)]
            for r in rows
        ]
        return adapter_summary(rows), table, str(out)
    except Exception as e:  # noqa: BLE001 - shown in the page
        return message(e), None, None


def on_calibrated(ex, budget, data_source, data_path, data_zip, request: gr.Request = None):
    """Stream (status, None) while it works: phase, step and ETA; then (the recommendation at `budget`
    calibrated on the chosen images, its exports)."""
    owner = visitor(request)
    try:
        if ex is None:
            raise ComcatError("press Explore first: the recommendation is for the explored model")
        data = common.chosen_data(data_source, data_path, data_zip, ex.spec)
        job = RECOMMEND.start(
            lambda cb, stop: ex.calibrated_recommendation(budget, data, lambda i, n, what: cb((what, i, n))), owner
        )
    except Exception as e:  # noqa: BLE001 - shown in the page
        yield message(e), None
        return
    started, phase, phase_started = time.perf_counter(), None, time.perf_counter()
    yield "**loading the images**", None
    for events in job.stream(0.5):
        if not events:
            continue
        what, i, n = events[-1]
        if what != phase:
            phase, phase_started = what, time.perf_counter()
        rate = (time.perf_counter() - phase_started) / (i + 1)
        yield (
            f"**{what}** · step {i + 1}/{n} · ETA {rate * (n - i - 1):.0f} s · "
            f"{time.perf_counter() - started:.0f} s elapsed",
            None,
        )
    yield (message(job.error), None) if job.error is not None else job.result


def on_compare(ex, upload, request: gr.Request = None):
    """-> (text, per-head error figure, exports) of a compressed model against the explored one."""
    visitor(request)
    try:
        if ex is None:
            raise ComcatError("press Explore on the dense model first: the compressed one is compared with it")
        return ex.compare(upload)
    except Exception as e:  # noqa: BLE001 - shown in the page
        return message(e), None, None


def on_budget(ex, budget):
    try:
        return ex.recommendation(budget) if ex is not None else gr.skip()
    except Exception as e:  # noqa: BLE001 - shown in the page
        return message(e)


def on_replot(ex, shown, layer):
    if ex is None:
        return gr.skip(), gr.skip()
    heat, heads, _ = ex.figures([PLOT_NAMES[s] for s in shown], layer)
    return heat, heads


def explore_tab(page: gr.Blocks | None = None):
    """The tab; with `page`, the embedded model is explored when the page opens (never empty)."""
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio(list(SOURCES), value="embedded", label="model")
            name, upload, arch = model_inputs()
            shown = gr.CheckboxGroup(list(PLOT_NAMES), value=list(PLOT_NAMES), label="heatmaps")
            layer = gr.Slider(0, 5, value=0, step=1, label="layer for per-head spectra")  # its range: the model's
            go = gr.Button("Explore", variant="primary", elem_id="explore-go")
            budget = gr.Slider(
                0.1,
                1.0,
                value=0.5,
                step=0.05,
                label="recommend ranks at this fraction of the attention parameters",
                elem_id="explore-budget",
            )
            to_compress = gr.Button("Compress this model at this budget", elem_id="explore-to-compress")
        with gr.Column(scale=3):
            summary = gr.Markdown(elem_id="explore-summary")
            advice = gr.Markdown(elem_id="explore-recommendation")
            heat = gr.Plot(label="cumulative singular-value energy", elem_id="explore-heatmap")
            curves = gr.Plot(label="head vs matrix level")
            heads = gr.Plot(label="per-head spectra")
            table = gr.Dataframe(
                headers=[SHORT.get(c, c) for c in COLUMNS],
                label="per layer: spectral metrics against shuffled weights (structure: how far from noise)",
                elem_id="explore-table",
                interactive=False,
                max_height=400,
                wrap=True,
            )
            with gr.Accordion("what the columns mean", open=False, elem_id="explore-legend"):
                gr.Markdown("\n".join(f"- **{SHORT.get(c, c)}**: {COLUMN_HELP[c]}" for c in COLUMNS))
            files = gr.File(label="export (JSON, CSV, PNG)", file_count="multiple")
            with gr.Accordion("calibrate the recommendation on your images", open=False, elem_id="explore-calibrate"):
                c_source = gr.Radio(
                    list(common.DATA_SOURCES),
                    value="embedded shapes",
                    label="images, or sentences for a text encoder (labels not needed)",
                    elem_id="explore-data",
                )
                c_path = gr.Textbox(label="image folder under the app's --data-root")
                c_zip = gr.File(
                    label="zip of an image folder (a text encoder: a text file of sentences)",
                    file_types=[".zip", ".txt"],
                    type="filepath",
                )
                c_go = gr.Button("Recommend with my images", elem_id="explore-calibrate-go")
                c_advice = gr.Markdown(elem_id="explore-calibrated")
                c_files = gr.File(label="export (JSON; ranks.json holds the recommended ranks)", file_count="multiple")
            with gr.Accordion("a compressed model against this one", open=False, elem_id="explore-compare"):
                k_zip = gr.File(
                    label="compressed model (the zip Compress gives)",
                    file_types=[".zip"],
                    type="filepath",
                    elem_id="explore-compare-zip",
                )
                k_go = gr.Button("Compare with the explored model", elem_id="explore-compare-go")
                k_text = gr.Markdown(elem_id="explore-compare-summary")
                k_plot = gr.Plot(label="relative error per head")
                k_files = gr.File(label="export (CSV, PNG)", file_count="multiple")
            with gr.Accordion("a COMCAT adapter against its base model", open=False, elem_id="explore-adapter"):
                a_pipeline = gr.Textbox("embedded", label="pipeline: embedded or a hub ID")
                example = str(EXAMPLE_ADAPTER) if EXAMPLE_ADAPTER.is_file() else None
                a_file = gr.File(example, label="adapter (.safetensors)", type="filepath", file_types=[".safetensors"])
                a_go = gr.Button("Inspect the adapter", elem_id="explore-adapter-go")
                a_summary = gr.Markdown(elem_id="explore-adapter-summary")
                a_table = gr.Dataframe(
                    headers=list(ADAPTER_COLUMNS),
                    interactive=False,
                    max_height=400,
                    label="per attention: the update's size against the base, mean and max "
                    "over heads, and its largest singular value",
                    elem_id="explore-adapter-table",
                )
                a_csv = gr.File(label="export (CSV)")
    state = gr.State(time_to_live=common.SESSION_TTL_S)
    explored = go.click(
        on_explore,
        [source, name, upload, arch, shown, layer, budget],
        [heat, heads, curves, summary, files, table, advice, layer, state],
        concurrency_id="explore",
        concurrency_limit=2,
    )
    for control in (shown, layer):
        control.change(on_replot, [state, shown, layer], [heat, heads], concurrency_id="explore")
    follow_typing(name, upload, source, "timm name", "uploaded checkpoint")
    budget.release(on_budget, [state, budget], advice, concurrency_id="explore")
    budget.input(on_budget, [state, budget], advice, concurrency_id="explore", trigger_mode="always_last")  # typed
    follow_typing(c_path, c_zip, c_source, "folder path", "uploaded zip")
    if page is not None:
        page.load(
            on_explore,
            [source, name, upload, arch, shown, layer, budget],
            [heat, heads, curves, summary, files, table, advice, layer, state],
            concurrency_id="explore",
            api_visibility="private",
        )
    c_go.click(on_calibrated, [state, budget, c_source, c_path, c_zip], [c_advice, c_files], concurrency_id="explore")
    k_go.click(on_compare, [state, k_zip], [k_text, k_plot, k_files], concurrency_id="explore")
    a_go.click(on_inspect_adapter, [a_pipeline, a_file], [a_summary, a_table, a_csv], concurrency_id="generate")
    return state, explored, to_compress, budget
