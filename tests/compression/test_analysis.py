from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

from comcat.compression.analysis import analyze, head_factors
from comcat.compression.families import head_weights
from comcat.core.linalg import cumulative_energy, product_svd, product_svdvals, rank_for_energy
from conftest import png_folder


@pytest.mark.parametrize("shape", [(5, 48, 8), (2, 3, 96, 32)])
def test_product_svd_matches_direct_svd(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    u, s, v = product_svd(x, y)
    m = x @ y.transpose(-1, -2)
    direct = torch.linalg.svdvals(m)[..., : shape[-1]]
    assert torch.allclose(s, direct, rtol=1e-10, atol=1e-12)
    assert torch.allclose(product_svdvals(x, y), direct, rtol=1e-10, atol=1e-12)
    assert torch.allclose(u @ torch.diag_embed(s) @ v.transpose(-1, -2), m, atol=1e-10)
    eye = torch.eye(shape[-1], dtype=torch.float64)
    assert torch.allclose(u.transpose(-1, -2) @ u, eye, atol=1e-10)
    assert torch.allclose(v.transpose(-1, -2) @ v, eye, atol=1e-10)


def test_head_spectra_equal_svd_of_formed_products():
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    spectra = analyze(model)
    attn = model.blocks[3].attn
    hw = head_weights(attn)
    for h in range(hw.num_heads):
        qk = hw.wq[h] @ hw.wk[h].T  # W^QK_h = W^Q_h W^K_h^T, C x C
        vo = hw.wv[h] @ hw.wo[h].T  # W^VO_h = W^V_h W^O_h
        for p, m in (("qk", qk), ("vo", vo)):
            direct = torch.linalg.svdvals(m)[: hw.head_dim].numpy()
            np.testing.assert_allclose(spectra.head[p][3, h], direct, rtol=1e-9, atol=1e-12)
    # matrix level: the (out, in) weights of the qkv and proj linears
    C = attn.qkv.in_features
    direct = torch.linalg.svdvals(attn.qkv.weight[C : 2 * C].detach().double()).numpy()
    np.testing.assert_allclose(spectra.matrix["k"][3], direct, rtol=0, atol=1e-5 * direct[0])
    assert spectra.head["qk"].shape == (12, 3, 64) and spectra.matrix["o"].shape == (12, 192)


def test_head_factor_orientation():
    """The per-head products are the maps the attention actually applies."""
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval().double()
    attn = model.blocks[0].attn
    x = torch.randn(7, 192, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(7, 3, 3, 64).unbind(1)
    (wq, wk), (wv, wo) = head_factors(attn)["qk"], head_factors(attn)["vo"]
    bq, bk, bv = attn.qkv.bias.double().reshape(3, 3, 64)
    h = 1
    logits = (q[:, h] - bq[h]) @ (k[:, h] - bk[h]).T
    assert torch.allclose(logits, x @ (wq[h] @ wk[h].T) @ x.T, atol=1e-10)
    out_h = (v[:, h] - bv[h]) @ attn.proj.weight.double()[:, h * 64 : (h + 1) * 64].T
    assert torch.allclose(out_h, x @ (wv[h] @ wo[h].T), atol=1e-10)


def test_energy_and_rank_for_energy():
    s = np.array([[3.0, 2.0, 1.0, 0.0]])
    e = cumulative_energy(s)
    np.testing.assert_allclose(e, [[9 / 14, 13 / 14, 1.0, 1.0]])
    assert rank_for_energy(s, 0.5).tolist() == [1]
    assert rank_for_energy(s, 0.9).tolist() == [2]
    assert rank_for_energy(s, 1.0).tolist() == [3]


def test_param_curves_and_summary(embedded):
    spectra = analyze(embedded.model)
    curves = spectra.param_curves()
    assert curves["dense"] == 4 * 128 * 128 * 6
    assert all(np.diff(curves["head"]) >= 0) and all(np.diff(curves["matrix"]) >= 0)
    # head-level products have rank <= d, so at full energy head level costs at most the dense layer
    assert spectra.head_params(1.0) <= curves["dense"]
    assert "head level" in spectra.summary(0.9)
    d = spectra.to_dict()
    assert len(d["singular_values"]["qk"]) == 6 and len(d["singular_values"]["qk"][0]) == 4


def test_plot_builders(embedded, tmp_path):
    from comcat.compression.plots import (
        energy_heatmaps_plotly,
        energy_maps,
        head_spectra_plotly,
        param_curves_plotly,
        save_analysis_plots,
    )

    spectra = analyze(embedded.model)
    maps = energy_maps(spectra)
    assert maps["q"].shape == (6, 128) and maps["qk"].shape == (6, 32)
    assert np.allclose(maps["vo"][:, -1], 1.0) and (np.diff(maps["vo"], axis=1) >= -1e-12).all()
    fig = energy_heatmaps_plotly(spectra)
    assert len(fig.data) == 6 and np.asarray(fig.data[4].z).shape == (6, 32)
    assert len(head_spectra_plotly(spectra, 2).data) == 2 * 4
    curves = param_curves_plotly(spectra)
    assert [t.name.split()[0] for t in curves.data] == ["matrix", "head"]
    paths = save_analysis_plots(spectra, tmp_path)
    assert [p.name for p in paths] == ["energy_heatmaps.png", "param_curves.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_layer_diagnosis_metrics_and_the_shuffled_reference(embedded, tmp_path):
    """The metrics on known spectra, and a learned model against its own shuffled weights: the
    per-head products carry more structure than noise, and the CLI writes the table as CSV."""
    import csv

    from comcat.cli import main
    from comcat.compression.diagnose import effective_rank, hill_alpha, layer_table, stable_rank

    flat = np.ones(10)
    assert stable_rank(flat) == 10 and abs(effective_rank(flat) - 10) < 1e-9
    assert stable_rank(np.array([1.0, 0, 0])) == 1 and abs(effective_rank(np.array([1.0, 0, 0])) - 1) < 1e-9
    power = np.arange(1, 2001, dtype=float) ** -1.0  # lambda_i = s_i^2 ~ i^-2: a heavier tail than flat
    assert hill_alpha(power) < hill_alpha(np.linspace(1, 0.9, 2000))
    rows = layer_table(embedded.model)
    assert len(rows) == 6 * 6 and {r["site"] for r in rows} == {"q", "k", "v", "o", "qk", "vo"}
    assert all(r["r90"] <= r["r95"] <= r["r99"] for r in rows)
    assert all(r["structure"] > 0.1 for r in rows if r["site"] in ("qk", "vo"))
    out = tmp_path / "layers.csv"
    assert main(["analyze", "--table", str(out)]) == 0
    table = list(csv.DictReader(out.open()))
    assert len(table) == 36 and float(table[0]["effective_rank"]) == round(rows[0]["effective_rank"], 4)


def test_recommendation_is_the_budget_rule_with_its_savings(embedded):
    from comcat.compression.cost import model_params
    from comcat.compression.diagnose import recommend, recommendation_text
    from comcat.compression.rank_rules import energy_ranks_for_budget

    rec = recommend(embedded.model, 0.5)
    cfg = energy_ranks_for_budget(embedded.model, "head", 0.5)
    assert rec["ranks"]["blocks"] == cfg.blocks and rec["params"][1] == model_params(embedded.model, cfg)
    assert rec["params"][1] < rec["params"][0] and rec["flops"][1] < rec["flops"][0]
    for layer in rec["layers"]:
        assert len(layer["heads_qk"]) == embedded.model.blocks[0].attn.num_heads
        assert all(0 < k <= 1 + 1e-12 for k in layer["heads_qk"] + layer["heads_vo"])
    text = recommendation_text(rec)
    assert "single heads keeping least: layer" in text and f"{rec['params'][1]:,}" in text
    assert recommend(embedded.model, 0.3)["params"][1] < rec["params"][1]


def test_head_errors_find_the_heads_a_compression_lost(embedded):
    """Exact at full rank; at half rank the list is sorted and its largest error is the one measured
    by forming that head's products."""
    from comcat.compression.convert import compress
    from comcat.compression.diagnose import head_errors
    from comcat.compression.rank_rules import uniform_ranks

    full = compress(embedded.model, uniform_ranks(embedded.model, "head", 1.0))
    assert max(r["error"] for r in head_errors(embedded.model, full)) < 1e-5
    small = compress(embedded.model, uniform_ranks(embedded.model, "head", 0.5))
    rows = head_errors(embedded.model, small)
    assert [r["error"] for r in rows] == sorted((r["error"] for r in rows), reverse=True)
    top = rows[0]
    dense_attn, attn = embedded.model.blocks[top["layer"]].attn, small.blocks[top["layer"]].attn
    d, C = dense_attn.head_dim, dense_attn.qkv.in_features
    h, r = top["head"], attn.rank_qk if top["product"] == "qk" else attn.rank_vo
    w = dense_attn.qkv.weight.double()
    if top["product"] == "qk":
        full_h = w[h * d : (h + 1) * d].T @ w[C + h * d : C + (h + 1) * d]
        approx = attn.q.weight[h * r : (h + 1) * r].double().T @ attn.k.weight[h * r : (h + 1) * r].double()
    else:
        full_h = w[2 * C + h * d : 2 * C + (h + 1) * d].T @ dense_attn.proj.weight[:, h * d : (h + 1) * d].double().T
        approx = attn.v.weight[h * r : (h + 1) * r].double().T @ attn.proj.weight[:, h * r : (h + 1) * r].double().T
    assert abs(top["error"] - (torch.linalg.norm(full_h - approx) / torch.linalg.norm(full_h)).item()) < 1e-9


def test_calibrated_recommendation_is_the_allocation_compress_starts_from(embedded):
    """With images, the recommendation is allocate.calibrated_ranks on the fit split a compress run
    uses, within the same budget; its predicted KL is the sum of the sites' curves at its ranks."""
    from comcat.compression.allocate import calibrated_ranks
    from comcat.compression.cost import Budget, budget_target
    from comcat.compression.diagnose import calibrate_on, error_grid, recommend, recommendation_text

    cal = calibrate_on(embedded.model, None, images=128)
    rec = recommend(embedded.model, 0.5, cal=cal)
    cost_fn, target = budget_target(embedded.model, 0.5, "params", False)
    cfg, sites = calibrated_ranks(embedded.model, cal, Budget(0.5))
    assert rec["rule"] == "calibrated" and rec["ranks"]["blocks"] == cfg.blocks and rec["images"] == 128
    assert rec["params"][1] == cost_fn(cfg) <= target
    assert rec["predicted_kl"]["calibrated"] == pytest.approx(sum(s.curve[cfg.blocks[s.block][s.key]] for s in sites))
    assert rec["plain_ranks"] == recommend(embedded.model, 0.5)["ranks"]
    text = recommendation_text(rec)
    assert "calibrated head-level ranks" in text and "measured on **128** of your images" in text
    assert error_grid([])["qk"].shape == (0, 0)


def test_cli_recommends_and_compares_a_compressed_model(embedded, tmp_path, capsys):

    from comcat.cli import main
    from comcat.compression.convert import compress
    from comcat.compression.format import save_compressed
    from comcat.compression.rank_rules import uniform_ranks

    assert main(["analyze", "--recommend", "0.4"]) == 0
    assert "At 40% of the attention parameters, head-level ranks" in capsys.readouterr().out
    photos = png_folder(tmp_path / "photos", 80, 3)
    assert main(["analyze", "--recommend", "0.4", "--data", str(photos)]) == 0
    assert "calibrated head-level ranks" in capsys.readouterr().out
    assert main(["analyze", "--data", str(photos)]) == 2
    assert "also pass --recommend R" in capsys.readouterr().err
    small = compress(embedded.model, uniform_ranks(embedded.model, "head", 0.5))
    folder = save_compressed(replace(embedded, model=small), tmp_path / "small")
    assert main(["analyze", "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "against embedded" in out and "heads that lost most: layer" in out
    assert main(["analyze", "--model", str(folder), "--recommend", "0.5"]) == 2
    assert "is a compressed model: analyze its dense source" in capsys.readouterr().err


def test_per_head_rows_are_per_head_figures_within_the_head_dim(embedded):
    """qk / vo rows are means over heads of each head's figures: none exceeds the head dim."""
    from comcat.compression.diagnose import COLUMN_HELP, COLUMNS, layer_table

    rows = layer_table(embedded.model)
    head_dim = 32
    for r in (r for r in rows if r["site"] in ("qk", "vo")):
        assert all(r[c] <= head_dim for c in ("stable_rank", "effective_rank", "r90", "r95", "r99")), r
        assert r["random_effective_rank"] <= head_dim and r["r90"] <= r["r95"] <= r["r99"]
    assert set(COLUMN_HELP) == set(COLUMNS)
