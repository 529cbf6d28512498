"""Per-layer rank configurations (the rules that choose them: rank_rules.py, allocate.py).

A RankConfig holds, per block, the ranks of the low-rank sites of one method:
  head:   {"qk": r, "vo": r, "fc1": r|None, "fc2": r|None}   (r <= head_dim for qk/vo)
  matrix: {"q": r, "k": r, "v": r, "o": r, "fc1": ..., "fc2": ...}  (r <= C; None keeps dense)
plus an optional rank for the classifier head. None always means "keep dense". Instead of fc1 /
fc2 ranks a block may keep {"neurons": k} of its MLP's hidden units (neurons.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from ..core.errors import ComcatError
from . import families
from .analysis import MATRICES
from .families.qk_maps import has_qk_map

METHODS = ("head", "matrix")
ATTN_SITES = {"head": ("qk", "vo"), "matrix": MATRICES}
MLP_SITES = ("fc1", "fc2")
NEURONS = "neurons"  # the number of MLP hidden units a block keeps
MLP_MODES = ("neurons", "lowrank")


def mlp_mode(mlp) -> str | None:
    """What `mlp` asks of the MLPs: None (kept dense), "lowrank" (True: fc1 / fc2 factorized) or "neurons"."""
    if mlp in (None, False):
        return None
    if mlp is True:
        return "lowrank"
    if mlp not in MLP_MODES:
        raise ComcatError(f"the MLPs are compressed by one of {MLP_MODES}, not {mlp!r}")
    return mlp


@dataclass
class RankConfig:
    method: str
    blocks: list[dict]
    classifier: int | None = None  # rank of the classifier (None: dense)
    note: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "blocks": self.blocks,
            "classifier": self.classifier,
            **({"note": self.note} if self.note else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "RankConfig":
        if not isinstance(d, dict) or "blocks" not in d:
            raise ComcatError('a rank config is JSON like {"method": "head", "blocks": [{"qk": 16, "vo": 16}, ...]}')
        method = d.get("method", "head")
        if method not in METHODS:
            raise ComcatError(f"rank config method must be one of {METHODS}, got {method!r}")
        blocks, head = d["blocks"], d.get("classifier", d.get("head"))  # "head": files before format /3
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise ComcatError('a rank config\'s "blocks" is a list with one {"qk": r, "vo": r} object per block')
        if head is not None and not _is_rank(head):
            raise ComcatError(f"classifier rank {head!r} is not a positive integer: use an integer or null")
        note = d.get("note", {})
        return cls(method, [dict(b) for b in blocks], head, note if isinstance(note, dict) else {})

    @classmethod
    def load(cls, path: str | Path) -> "RankConfig":
        from ..core.records import read_json

        fix = "pass a JSON rank file written by 'comcat compress' (its comcat.json 'ranks') or by hand"
        return cls.from_dict(read_json(path, "a rank file", fix))

    def validate(self, model: nn.Module) -> "RankConfig":
        """Check every rank against the model's shapes; raises ComcatError with what to change."""
        blocks = families.blocks(model)
        if len(self.blocks) != len(blocks):
            raise ComcatError(
                f"rank config has {len(self.blocks)} blocks but the model has {len(blocks)}: write one entry per block"
            )
        sites = ATTN_SITES[self.method] + MLP_SITES + (NEURONS,)
        for i, (b, ranks) in enumerate(zip(blocks, self.blocks)):
            if ranks.get(NEURONS) is not None and any(ranks.get(fc) is not None for fc in MLP_SITES):
                raise ComcatError(f"block {i}: an MLP keeps neurons or has fc1 / fc2 ranks, not both")
            if ranks.get(NEURONS) is not None and hidden_width(b) is None:
                raise ComcatError(f"block {i}: its MLP is not two linears around an activation: drop 'neurons'")
            unknown = set(ranks) - set(sites)
            if unknown:
                raise ComcatError(
                    f"block {i}: unknown rank keys {sorted(unknown)} for method {self.method!r}; allowed: {list(sites)}"
                )
            limits = {**site_limits(b, self.method), NEURONS: hidden_width(b)}
            for site, r in fixed_ranks(b, self.method).items():
                if ranks.get(site) != r:
                    raise ComcatError(
                        f"block {i}: a rotary or cosine attention keeps W^Q and W^K dense, so its {site!r} rank "
                        f"is {r}, got {ranks.get(site)!r}: set it to {r}"
                    )
            for site in sites:
                r = ranks.get(site)
                if site in ATTN_SITES[self.method] and r is None and self.method == "head":
                    raise ComcatError(f"block {i}: head-level method needs a rank for {site!r} (1..{limits[site]})")
                if r is not None and (not _is_rank(r) or not 1 <= r <= limits[site]):
                    raise ComcatError(
                        f"block {i}: rank {site}={r!r} is out of range: use an integer in 1..{limits[site]}"
                    )
        heads = families.classifiers(model)
        if self.classifier is not None and not heads:
            raise ComcatError("the model has no classifier: set the classifier rank to null")
        if self.classifier is not None:
            lim = min(min(h.in_features, h.out_features) for h in heads.values())
            if not 1 <= self.classifier <= lim:
                raise ComcatError(f"classifier rank {self.classifier} is out of range: use 1..{lim} or null")
        return self


def _is_rank(r) -> bool:
    """An integer (JSON true/false are not ranks)."""
    return isinstance(r, (int, np.integer)) and not isinstance(r, (bool, np.bool_))


def fixed_ranks(block: nn.Module, method: str) -> dict[str, int]:
    """Ranks a block's attention fixes: at head level the QK path of a rotary or cosine attention stays dense, r_qk = d
    (families/qk_maps.py); no rule chooses them."""
    attn = families.attention(block)
    if method != "head" or not has_qk_map(attn):
        return {}
    return {"qk": getattr(attn, "rank_qk", None) or attn.head_dim}  # a factorized one holds W^Q_h, W^K_h at r = d


def pin(cfg: RankConfig, model: nn.Module) -> RankConfig:
    """cfg with every block's fixed ranks set (in place); returns cfg."""
    for b, r in zip(families.blocks(model), cfg.blocks):
        r.update(fixed_ranks(b, cfg.method))
    return cfg


def site_limits(block: nn.Module, method: str) -> dict[str, int]:
    """Largest meaningful rank of each site of one block."""
    attn = families.attention(block)
    C = attn.qkv.in_features
    lim = {"qk": attn.head_dim, "vo": attn.head_dim} if method == "head" else {m: C for m in MATRICES}
    for fc, lin in families.mlp(block).items():
        lim[fc] = min(lin.in_features, lin.out_features)
    return lim


def hidden_width(block: nn.Module) -> int | None:
    """The hidden units of a block's MLP when it is fc2(act(fc1(x))) with an element-wise act, so that
    neurons can be dropped (None for a gated or hidden-normed MLP)."""
    lins = families.mlp(block)
    fc1, fc2 = lins.get("fc1"), lins.get("fc2")
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)) or fc1.out_features != fc2.in_features:
        return None
    parent = getattr(block, "mlp", None)
    if parent is not None and not isinstance(getattr(parent, "norm", nn.Identity()), nn.Identity):
        return None
    return fc1.out_features
