"""What an adapter changes: per attention and head, the size of its updates against the base.

Head h of an attention gains alpha A_h B_h^T on W^QK_h = W^Q_h (W^K_h)^T and alpha P_h R_h on
W^VO_h = W^V_h W^O_h (layer.py). Per attention, over its heads:

  qk_change = ||alpha A_h B_h^T||_F / ||W^QK_h||_F   (mean and max over heads), vo_change likewise,

and the update's singular values (from thin QRs of its two factors, analysis.product_svdvals).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ...core.linalg import product_svdvals, split_heads
from .joint import JointHeadLowRank
from .layer import ComcatAttnProcessor
from .model import _processors, _unet, attention_sites, load_adapter, output_projection, site_kind, unload_adapter

COLUMNS = (
    "site",
    "kind",
    "heads",
    "rank",
    "qk_change_mean",
    "qk_change_max",
    "vo_change_mean",
    "vo_change_max",
    "qk_update_sv",
    "vo_update_sv",
)


def _norms(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(H,) Frobenius norms of X_h Y_h^T for factors (H, n, k), (H, m, k)."""
    return torch.linalg.vector_norm(product_svdvals(x.double(), y.double()), dim=-1).numpy()


@torch.no_grad()
def _parts(attn, adapter, out) -> list[tuple]:
    """(kind, HeadLowRank, (query, key, value, output) projections it updates) for one site whose
    output projection is `out`: a joint attention's parts each pair their own streams' projections."""
    if not isinstance(adapter, JointHeadLowRank):
        return [(site_kind(attn), adapter, (attn.to_q, attn.to_k, attn.to_v, out))]
    if not hasattr(attn, "add_k_proj"):  # Flux's single-stream blocks: self-attention over [C; X]
        return [("self", adapter.self, (attn.to_q, attn.to_k, attn.to_v, out))]
    ctx_out = getattr(attn, "to_add_out", None) or out
    lins = {
        "self": (attn.to_q, attn.to_k, attn.to_v, out),
        "cross": (attn.to_q, attn.add_k_proj, attn.add_v_proj, out),
        "context": (attn.add_q_proj, attn.to_k, attn.to_v, ctx_out),
    }
    return [(f"joint {part}", m, lins[part]) for part, m in adapter.named_children()]


def _measure(m, alpha: float, H: int, lins) -> dict:
    """The relative size of the update of each head's W^QK_h and W^VO_h, and its singular values."""
    to_q, to_k, to_v, to_out = lins
    d = to_q.out_features // H
    wq, wk, wv = (split_heads(lin.weight, H) for lin in (to_q, to_k, to_v))
    wo = to_out.weight.detach().reshape(-1, H, d).permute(1, 0, 2)  # (H, Do, d)
    a, b, p = (split_heads(t.t(), H) for t in (m.A, m.B, m.P))  # (H, D, r)
    r = m.R.detach().reshape(H, m.rank, -1).transpose(1, 2)  # (H, Do, r)
    qk = _norms(alpha * a, b) / np.maximum(_norms(wq, wk), 1e-30)
    vo = _norms(alpha * p, r) / np.maximum(_norms(wv, wo), 1e-30)
    return {
        "heads": H,
        "rank": m.rank,
        "qk_change_mean": float(qk.mean()),
        "qk_change_max": float(qk.max()),
        "vo_change_mean": float(vo.mean()),
        "vo_change_max": float(vo.max()),
        "qk_update_sv": product_svdvals((alpha * a).double(), b.double()).mean(0).tolist(),
        "vo_update_sv": product_svdvals((alpha * p).double(), r.double()).mean(0).tolist(),
    }


def adapter_table(pipe, path, name: str = "inspected") -> list[dict]:
    """Load the adapter file `path` into `pipe`, measure its updates site by site (module
    docstring), and unload it again (the pipeline is left as it was)."""
    name = load_adapter(pipe, path, name=name)
    try:
        unet, rows = _unet(pipe), []
        procs = _processors(unet)
        for site, attn in sorted(attention_sites(unet).items()):
            proc = procs.get(site)
            if not isinstance(proc, ComcatAttnProcessor) or name not in proc.adapters:
                continue
            out = SimpleNamespace(weight=output_projection(unet, site, attn)[1])
            for kind, m, lins in _parts(attn, proc.adapters[name], out):
                rows.append({"site": site, "kind": kind, **_measure(m, proc.scales[name], attn.heads, lins)})
        return rows
    finally:
        unload_adapter(pipe, name)


def adapter_summary(rows: list[dict]) -> str:
    """Where the adapter acts most (one line)."""
    kinds = [
        k for k in ("self", "cross", "joint self", "joint cross", "joint context") if any(r["kind"] == k for r in rows)
    ]
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in kinds}
    parts = [
        f"{k}-attention changes W^QK by {np.mean([r['qk_change_mean'] for r in rs]):.1%} and W^VO by "
        f"{np.mean([r['vo_change_mean'] for r in rs]):.1%} on average"
        for k, rs in by_kind.items()
        if rs
    ]
    top = max(rows, key=lambda r: max(r["qk_change_max"], r["vo_change_max"]))
    most = max(top["qk_change_max"], top["vo_change_max"])
    return "; ".join(parts) + f"; most in {top['site']} ({most:.1%} for one head)."


def to_csv(rows: list[dict]) -> str:
    """The table without the singular values (their top value per site instead)."""
    import csv
    import io

    buf = io.StringIO()
    fields = [c for c in COLUMNS if not c.endswith("_sv")] + ["qk_update_s1", "vo_update_s1"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items() if not k.endswith("_sv")},
                "qk_update_s1": round(r["qk_update_sv"][0], 6),
                "vo_update_s1": round(r["vo_update_sv"][0], 6),
            }
        )
    return buf.getvalue()
