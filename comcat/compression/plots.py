"""Figures of the analysis: plotly (interactive, for the app) and matplotlib (PNG, for the CLI).

Figure 1: cumulative singular-value energy, layers x rank fraction, for W^Q, W^K, W^V, W^O and the
per-head W^QK, W^VO (pooled over a layer's heads). Figure 2: attention parameters needed to keep an
energy threshold, matrix level vs head level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.files import atomic_write
from ..core.linalg import cumulative_energy
from .analysis import MATRICES, PRODUCTS, Spectra

TITLES = {
    "q": "W<sup>Q</sup>",
    "k": "W<sup>K</sup>",
    "v": "W<sup>V</sup>",
    "o": "W<sup>O</sup>",
    "qk": "W<sup>QK</sup><sub>h</sub> (per head)",
    "vo": "W<sup>VO</sup><sub>h</sub> (per head)",
}
MPL_TITLES = {
    "q": "$W^Q$",
    "k": "$W^K$",
    "v": "$W^V$",
    "o": "$W^O$",
    "qk": "$W^{QK}_h$ (per head)",
    "vo": "$W^{VO}_h$ (per head)",
}
ALL = MATRICES + PRODUCTS


def energy_maps(spectra: Spectra) -> dict[str, np.ndarray]:
    """name -> (L, n) cumulative energy by rank, n = C for matrices, d for head products."""
    maps = {m: cumulative_energy(spectra.matrix[m]) for m in MATRICES}
    maps.update({p: spectra.layer_head_energy(p) for p in PRODUCTS})
    return maps


def rank_fraction(n: int) -> np.ndarray:
    return np.arange(1, n + 1) / n


# ---------------------------------------------------------------- plotly
def energy_heatmaps_plotly(spectra: Spectra, names=ALL):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    maps = energy_maps(spectra)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[TITLES[n] for n in names], horizontal_spacing=0.06, vertical_spacing=0.14
    )
    for i, name in enumerate(names):
        z = maps[name]
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=rank_fraction(z.shape[1]),
                y=list(range(z.shape[0])),
                zmin=0,
                zmax=1,
                colorscale="Viridis",
                showscale=i == 0,
                colorbar=dict(title="energy"),
                hovertemplate="layer %{y}<br>rank %{x:.0%}<br>energy %{z:.3f}<extra>" + name + "</extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_xaxes(title_text="rank / full rank", tickformat=".0%")
    fig.update_yaxes(title_text="layer", autorange="reversed")
    fig.update_layout(height=330 * rows, title="Cumulative singular-value energy", margin=dict(t=80, l=50, r=20, b=40))
    return fig


def head_spectra_plotly(spectra: Spectra, layer: int):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{TITLES[p]}, layer {layer}" for p in PRODUCTS])
    for j, p in enumerate(PRODUCTS):
        for h, s in enumerate(spectra.head_spectra(p, layer)):
            fig.add_trace(
                go.Scatter(x=np.arange(1, len(s) + 1), y=s / s[0], name=f"{p} head {h}", mode="lines"), row=1, col=j + 1
            )
    fig.update_xaxes(title_text="index i")
    fig.update_yaxes(title_text="sᵢ / s₁", type="log", dtick=1, minor=dict(showgrid=False), tickformat=".0e")
    fig.update_layout(height=380, title="Per-head singular values")
    return fig


def param_curves_plotly(spectra: Spectra):
    import plotly.graph_objects as go

    c = spectra.param_curves()
    fig = go.Figure()
    for key, label in (("matrix", "matrix level (W^Q, W^K, W^V, W^O)"), ("head", "head level (W^QK_h, W^VO_h)")):
        fig.add_trace(go.Scatter(x=c["energy"], y=np.array(c[key]) / c["dense"], name=label, mode="lines+markers"))
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="dense")
    fig.update_layout(
        title="Attention parameters needed to keep an energy threshold",
        height=400,
        xaxis=dict(title="retained energy", tickformat=".0%"),
        yaxis=dict(title="params / dense attention params", tickformat=".0%"),
    )
    return fig


# ---------------------------------------------------------------- matplotlib
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def energy_heatmaps_mpl(spectra: Spectra, names=ALL):
    plt = _plt()
    maps = energy_maps(spectra)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    for ax, name in zip(axes.flat, names):
        z = maps[name]
        im = ax.imshow(z, aspect="auto", vmin=0, vmax=1, cmap="viridis", extent=(0, 1, z.shape[0] - 0.5, -0.5))
        ax.set(title=MPL_TITLES[name], xlabel="rank / full rank", ylabel="layer")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="cumulative energy")
    return fig


def param_curves_mpl(spectra: Spectra):
    plt = _plt()
    c = spectra.param_curves()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c["energy"], np.array(c["matrix"]) / c["dense"], "o-", ms=3, label="matrix level")
    ax.plot(c["energy"], np.array(c["head"]) / c["dense"], "o-", ms=3, label="head level")
    ax.axhline(1.0, ls=":", c="gray")
    ax.set(
        xlabel="retained energy", ylabel="params / dense attention params", title="Params to keep an energy threshold"
    )
    ax.legend()
    fig.tight_layout()
    return fig


def rank_table(ranks, model) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(site names, ranks (L, S) with NaN for dense sites, ranks / full rank (L, S)) of a RankConfig."""
    from . import families
    from .ranks import ATTN_SITES, MLP_SITES, site_limits

    sites = [s for s in ATTN_SITES[ranks.method] + MLP_SITES if any(b.get(s) is not None for b in ranks.blocks)]
    r = np.array([[np.nan if b.get(s) is None else b[s] for s in sites] for b in ranks.blocks], float)
    full = np.array([[site_limits(blk, ranks.method)[s] for s in sites] for blk in families.blocks(model)], float)
    return sites, r, r / full


def ranks_heatmap_plotly(ranks, model):
    import plotly.graph_objects as go

    sites, r, frac = rank_table(ranks, model)
    text = [["dense" if np.isnan(v) else str(int(v)) for v in row] for row in r]
    fig = go.Figure(
        go.Heatmap(
            z=frac,
            x=sites,
            y=list(range(len(r))),
            text=text,
            texttemplate="%{text}",
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            colorbar=dict(title="rank / full"),
        )
    )
    fig.update_layout(
        title="Chosen ranks",
        xaxis_title="site",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        height=120 + 32 * len(r),
        margin=dict(t=50, l=50, r=20, b=40),
    )
    return fig


def ranks_heatmap_mpl(ranks, model):
    plt = _plt()
    sites, r, frac = rank_table(ranks, model)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(sites), 1.2 + 0.35 * len(r)), layout="constrained")
    im = ax.imshow(frac, aspect="auto", vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(r):
        ax.text(
            j,
            i,
            "dense" if np.isnan(v) else int(v),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if frac[i, j] < 0.6 else "black",
        )
    ax.set(
        xticks=range(len(sites)),
        xticklabels=sites,
        yticks=range(len(r)),
        xlabel="site",
        ylabel="layer",
        title="chosen ranks (colour: rank / full rank)",
    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def head_errors_plotly(grid: dict[str, np.ndarray]):
    """Per-head relative error of a compressed model's W^QK_h and W^VO_h (diagnose.error_grid)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(PRODUCTS), subplot_titles=[TITLES[p] for p in PRODUCTS])
    top = max(float(np.nanmax(z)) if np.isfinite(z).any() else 0.0 for z in grid.values()) or 1.0
    for j, (p, z) in enumerate(grid.items()):
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=list(range(z.shape[1])),
                y=list(range(z.shape[0])),
                zmin=0,
                zmax=top,
                colorscale="Magma",
                reversescale=True,
                showscale=j == 0,
                colorbar=dict(title="error", tickformat=".0%"),
                hovertemplate="layer %{y} head %{x}<br>error %{z:.1%}<extra>" + p + "</extra>",
            ),
            row=1,
            col=j + 1,
        )
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer", autorange="reversed")
    fig.update_layout(
        height=330, title="Compressed against dense: relative error per head", margin=dict(t=80, l=50, r=20, b=40)
    )
    return fig


def head_errors_mpl(grid: dict[str, np.ndarray]):
    plt = _plt()
    fig, axes = plt.subplots(1, len(PRODUCTS), figsize=(4 * len(PRODUCTS), 3.5), squeeze=False)
    top = max(float(np.nanmax(z)) if np.isfinite(z).any() else 0.0 for z in grid.values()) or 1.0
    for ax, (p, z) in zip(axes[0], grid.items()):
        im = ax.imshow(z, aspect="auto", cmap="magma_r", vmin=0, vmax=top)
        ax.set(title=MPL_TITLES[p], xlabel="head", ylabel="layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="relative error")
    return fig


def save_png(fig, path: str | Path) -> Path:
    """Save a matplotlib figure atomically and close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        _plt().close(fig)


def save_analysis_plots(spectra: Spectra, out_dir: str | Path) -> list[Path]:
    """Write energy_heatmaps.png and param_curves.png to out_dir; returns the paths."""
    out = Path(out_dir)
    return [
        save_png(fig, out / name)
        for name, fig in (
            ("energy_heatmaps.png", energy_heatmaps_mpl(spectra)),
            ("param_curves.png", param_curves_mpl(spectra)),
        )
    ]
