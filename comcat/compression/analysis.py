"""Low-rankness of attention: matrix-level and head-level singular-value spectra.

Head level (COMCAT): for head h, W^QK_h = W^Q_h (W^K_h)^T and W^VO_h = W^V_h W^O_h are C x C
products of two C x d factors, so rank <= d. Their spectra are computed exactly from thin QRs,
X = Q_x R_x, Y = Q_y R_y  =>  X Y^T = Q_x (R_x R_y^T) Q_y^T, and one d x d SVD of the core,
never by forming or decomposing the C x C product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.linalg import cumulative_energy, product_svdvals, rank_for_energy
from . import families
from .families import head_weights, matrix_weights
from .families.qk_maps import has_qk_map

MATRICES = ("q", "k", "v", "o")
PRODUCTS = ("qk", "vo")
ENERGY_GRID = tuple(np.round(np.arange(0.50, 0.991, 0.01), 2).tolist())


def head_factors(attn) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The two (H, C, d) factors of each per-head product: W^QK_h = X Y^T, W^VO_h = X Y^T."""
    hw = head_weights(attn)
    return {"qk": (hw.wq, hw.wk), "vo": (hw.wv, hw.wo)}


@dataclass
class Spectra:
    """Singular values of every block's attention, float64 numpy.

    matrix[m]: (L, C) for m in q, k, v, o;  head[p]: (L, H, d) for p in qk, vo. In a model whose
    layers differ in width or heads (Swin's stages), C and H are the largest, the rest zeros, and
    dims / heads (L,) give each layer's own; dim, num_heads, head_dim are the first layer's.
    """

    matrix: dict[str, np.ndarray]
    head: dict[str, np.ndarray]
    dim: int
    num_heads: int
    head_dim: int
    dense_qk: np.ndarray | None = None  # (L,) bool: layers whose QK path stays dense (families/qk_maps.py)
    dims: np.ndarray | None = None  # (L,) widths, when they differ
    heads: np.ndarray | None = None  # (L,) head counts, when they differ

    @property
    def depth(self) -> int:
        return self.matrix["q"].shape[0]

    def layer_dims(self) -> np.ndarray:
        return self.dims if self.dims is not None else np.full(self.depth, self.dim)

    def layer_heads(self) -> np.ndarray:
        return self.heads if self.heads is not None else np.full(self.depth, self.num_heads)

    def shape_line(self) -> str:
        """'12 blocks, 3 heads of dim 64, width 192' (ranges where the layers differ)."""

        def span(a: np.ndarray) -> str:
            return f"{a.min()}" if a.min() == a.max() else f"{a.min()}-{a.max()}"

        heads, dims = self.layer_heads(), self.layer_dims()
        return (
            f"{self.depth} blocks, {span(heads)} heads of dim {self.head_dim}, "
            f"width{'s' if dims.min() != dims.max() else ''} {span(dims)}"
        )

    def head_spectra(self, p: str, layer: int) -> np.ndarray:
        """(H_layer, d): the layer's own heads (no padding)."""
        return self.head[p][layer][: self.layer_heads()[layer]]

    def layer_head_energy(self, p: str) -> np.ndarray:
        """(L, d): energy of a layer's products pooled over heads, E_r = sum_h sum_{i<=r} s_hi^2 / total."""
        return cumulative_energy(np.sqrt((self.head[p] ** 2).sum(1)))

    def matrix_params(self, energy: float) -> int:
        """Attention params to keep `energy` in each of W^Q, W^K, W^V, W^O (rank r costs 2Cr, capped at C^2)."""
        C = self.layer_dims()
        return int(sum(np.minimum(2 * C * rank_for_energy(self.matrix[m], energy), C * C).sum() for m in MATRICES))

    def head_params(self, energy: float) -> int:
        """Attention params to keep `energy` in every head's W^QK_h and W^VO_h (rank r costs 2Cr per head;
        a QK path that stays dense at its full d)."""
        ranks = {p: np.asarray(rank_for_energy(self.head[p], energy)) for p in PRODUCTS}  # (L, H)
        if self.dense_qk is not None:
            ranks["qk"][self.dense_qk] = self.head_dim
        own = np.arange(ranks["qk"].shape[1]) < self.layer_heads()[:, None]  # not the padding
        return int(sum((2 * self.layer_dims()[:, None] * r * own).sum() for r in ranks.values()))

    def dense_params(self) -> int:
        return int(4 * (self.layer_dims().astype(np.int64) ** 2).sum())

    def param_curves(self, grid=ENERGY_GRID) -> dict[str, list]:
        """Figure 2: attention params needed at each energy threshold, matrix vs head level."""
        return {
            "energy": list(grid),
            "matrix": [self.matrix_params(e) for e in grid],
            "head": [self.head_params(e) for e in grid],
            "dense": self.dense_params(),
        }

    def summary(self, energy: float = 0.9) -> str:
        m, h = self.matrix_params(energy), self.head_params(energy)
        return (
            f"At {energy:.0%} retained energy, head level needs {h:,} attention parameters and matrix "
            f"level {m:,}: head level is {1 - h / m:.0%} smaller ({h / self.dense_params():.0%} "
            f"of the dense {self.dense_params():,})."
            + (
                f" W^Q and W^K of the {int(self.dense_qk.sum())} rotary / cosine-attention layers stay dense "
                "(counted at full size)."
                if self.dense_qk is not None and self.dense_qk.any()
                else ""
            )
        )

    def to_dict(self) -> dict:
        return {
            "dim": self.dim,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "depth": self.depth,
            **({"dense_qk": self.dense_qk.tolist()} if self.dense_qk is not None else {}),
            **({"dims": self.dims.tolist(), "heads": self.heads.tolist()} if self.dims is not None else {}),
            "singular_values": {
                **{m: self.matrix[m].tolist() for m in MATRICES},
                **{p: self.head[p].tolist() for p in PRODUCTS},
            },
            "param_curves": self.param_curves(),
            "summary": self.summary(),
        }


def _stack(rows: list[torch.Tensor]) -> np.ndarray:
    """Per-layer arrays stacked, zero-padded to the largest shape (layers of different widths or heads)."""
    shape = np.max([r.shape for r in rows], axis=0)
    out = np.zeros((len(rows), *shape))
    for i, r in enumerate(rows):
        out[(i, *(slice(n) for n in r.shape))] = r.double().cpu().numpy()
    return out


@torch.no_grad()
def head_spectra(model: nn.Module) -> dict[str, np.ndarray]:
    """(L, H, d) singular values of W^QK_h and W^VO_h for every block, via thin QR."""
    out = {p: [] for p in PRODUCTS}
    for block in families.blocks(model):
        for p, (x, y) in head_factors(families.attention(block)).items():
            out[p].append(product_svdvals(x, y))
    return {p: _stack(v) for p, v in out.items()}


@torch.no_grad()
def matrix_spectra(model: nn.Module) -> dict[str, np.ndarray]:
    """(L, C) singular values of W^Q, W^K, W^V, W^O for every block.

    Full C x C SVDs dominate the analysis time, so they run in float32, the weights' own precision
    (errors ~1e-7 s_1, far below what energy curves resolve); head-level spectra stay float64.
    Layers of one width go through one batched SVD."""
    ws = [matrix_weights(families.attention(b)) for b in families.blocks(model)]
    out = {}
    for m in MATRICES:
        rows: list = [None] * len(ws)
        for C in {w[m].shape[0] for w in ws}:
            idx = [i for i, w in enumerate(ws) if w[m].shape[0] == C]
            for i, s in zip(idx, torch.linalg.svdvals(torch.stack([ws[i][m] for i in idx]).float()).double()):
                rows[i] = s
        out[m] = _stack(rows)
    return out


def analyze(model: nn.Module) -> Spectra:
    """Matrix-level and head-level spectra of every attention layer of a supported model."""
    attns = [families.attention(b) for b in families.blocks(model)]
    dense_qk = np.array([has_qk_map(a) for a in attns])
    dims, heads = np.array([a.qkv.in_features for a in attns]), np.array([a.num_heads for a in attns])
    uniform = (dims == dims[0]).all() and (heads == heads[0]).all()
    a = attns[0]
    return Spectra(
        matrix_spectra(model),
        head_spectra(model),
        a.qkv.in_features,
        a.num_heads,
        a.head_dim,
        dense_qk if dense_qk.any() else None,
        None if uniform else dims,
        None if uniform else heads,
    )
