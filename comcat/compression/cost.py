"""Analytic parameters and FLOPs (per layer and total), and measured latency.

FLOPs count 2 per multiply-accumulate of every matrix product (linear layers, patch embedding,
the two attention products), per image; element-wise work (norms, softmax, GELU) is not counted,
the same convention as torch.utils.flop_counter.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..core.errors import ComcatError, require
from . import families
from .ranks import MATRICES, METHODS, NEURONS, RankConfig, mlp_mode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _linear_cost(n_in: int, n_out: int, rank: int | None, bias: bool) -> int:
    return (n_in * n_out if rank is None else rank * (n_in + n_out)) + (n_out if bias else 0)


def _attn_dims(attn) -> tuple[int, int, int, bool, bool]:
    return attn.qkv.in_features, attn.num_heads, attn.head_dim, attn.qkv.bias is not None, attn.proj.bias is not None


def attention_params(attn, method: str | None, ranks: dict | None) -> int:
    """Params of one attention layer, dense (method None) or low-rank with `ranks`."""
    C, H, d, qkv_bias, proj_bias = _attn_dims(attn)
    if method is None:
        return 4 * C * C + (3 * C if qkv_bias else 0) + (C if proj_bias else 0)
    if method == "head":
        rq, rv = ranks["qk"], ranks["vo"]
        # q, k: 2 C H r_qk; query bias H r_qk; v: C H r_vo; proj: H r_vo C + C
        return 2 * C * H * rq + (H * rq if qkv_bias else 0) + 2 * C * H * rv + C
    return sum(_linear_cost(C, C, ranks.get(m), qkv_bias if m != "o" else proj_bias) for m in MATRICES)


def _block_ranks(ranks: RankConfig | None, i: int) -> dict:
    return ranks.blocks[i] if ranks is not None else {}


def layer_params(model: nn.Module, ranks: RankConfig | None = None) -> list[dict[str, int]]:
    """Per block: {"attn": params, "mlp": params} (fc1 + fc2 with biases) of the (compressed) model."""
    out = []
    for i, b in enumerate(families.blocks(model)):
        r = _block_ranks(ranks, i)
        attn = attention_params(families.attention(b), ranks.method if ranks else None, r)
        lins = families.mlp(b)
        if r.get(NEURONS) is not None:  # k hidden units: fc1 (C_in + 1) k, fc2 k C_out + C_out
            fc1, fc2 = lins["fc1"], lins["fc2"]
            k = r[NEURONS]
            mlp = k * (fc1.in_features + (fc1.bias is not None) + fc2.out_features) + (
                fc2.out_features if fc2.bias is not None else 0
            )
        else:
            mlp = sum(
                _linear_cost(lin.in_features, lin.out_features, r.get(fc), lin.bias is not None)
                for fc, lin in lins.items()
            )
        out.append({"attn": attn, "mlp": mlp})
    return out


def site_params(model: nn.Module, ranks: RankConfig | None, method: str, mlp: bool) -> int:
    """Params of the compressible sites: all attention, plus the MLPs when `mlp`."""
    layers = layer_params(model, ranks)
    return sum(l["attn"] + (l["mlp"] if mlp else 0) for l in layers)


def model_params(dense: nn.Module, ranks: RankConfig | None = None) -> int:
    """Total params of `dense` compressed with `ranks`, computed from shapes alone."""
    total = count_params(dense)
    for before, after in zip(layer_params(dense), layer_params(dense, ranks)):
        total += after["attn"] - before["attn"] + after["mlp"] - before["mlp"]
    if ranks is not None and ranks.classifier is not None:
        for lin in families.classifiers(dense).values():
            if isinstance(lin, nn.Linear):
                total += (
                    _linear_cost(lin.in_features, lin.out_features, ranks.classifier, lin.bias is not None)
                    - lin.weight.numel()
                    - (lin.bias.numel() if lin.bias is not None else 0)
                )
    return total


def layer_flops(model: nn.Module, ranks: RankConfig | None = None) -> list[dict[str, int]]:
    """Per block FLOPs of one image: {"attn": ..., "mlp": ...}."""
    out = []
    for i, (b, (N, K)) in enumerate(zip(families.blocks(model), families.block_tokens(model))):
        C, H, d, _, _ = _attn_dims(families.attention(b))  # N tokens, each attending to K (N in a ViT)
        r = _block_ranks(ranks, i)
        method = ranks.method if ranks else None
        if method == "head":
            rq, rv = r["qk"], r["vo"]
            macs = N * C * H * (2 * rq + rv) + N * H * rv * C + H * N * K * (rq + rv)
        else:
            macs = sum(N * (C * C if r.get(m) is None else r[m] * 2 * C) for m in MATRICES) + 2 * H * N * K * d
        lins = families.mlp(b)
        if r.get(NEURONS) is not None:
            mlp = N * r[NEURONS] * (lins["fc1"].in_features + lins["fc2"].out_features)
        else:
            mlp = sum(
                N
                * (
                    lin.in_features * lin.out_features
                    if r.get(fc) is None
                    else r[fc] * (lin.in_features + lin.out_features)
                )
                for fc, lin in lins.items()
            )
        out.append({"attn": 2 * macs, "mlp": 2 * mlp})
    return out


def model_flops(model: nn.Module, ranks: RankConfig | None = None) -> int:
    """FLOPs of one forward pass for one image: patch embedding + blocks + classifier(s)."""
    patch = families.patch_flops(model)
    heads = 0
    for lin in families.classifiers(model).values():
        if isinstance(lin, nn.Linear):
            rank = ranks.classifier if ranks is not None else None
            heads += 2 * (
                lin.in_features * lin.out_features if rank is None else rank * (lin.in_features + lin.out_features)
            )
    return patch + sum(l["attn"] + l["mlp"] for l in layer_flops(model, ranks)) + heads


@torch.no_grad()
def counted_flops(model: nn.Module, input_size=None) -> int:
    """FLOPs of one image counted by torch.utils.flop_counter (attention through the math kernel,
    so its two products are counted); works on any model, dense or compressed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from .lowrank import HeadLowRankAttention

    x = families.example_input(model, 1, input_size)
    padded = [m for m in model.modules() if isinstance(m, HeadLowRankAttention)]
    for m in padded:
        m.pad_heads = False  # count the factorized arithmetic, not alignment zeros
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.eval()(x)
    finally:
        for m in padded:
            del m.pad_heads  # back to the class default
    return counter.get_total_flops()


@torch.no_grad()
def measure_latency(
    model: nn.Module, batch: int = 1, input_size=None, device: str | None = None, warmup: int = 3, iters: int = 10
) -> float:
    """Median wall time of one forward pass in milliseconds."""
    device = device or next(model.parameters()).device.type
    model = model.eval().to(device)
    x = families.example_input(model, batch, input_size)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + iters):
        sync()
        t = time.perf_counter()
        model(x)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def compare_latency(
    models: dict[str, nn.Module],
    batch: int = 1,
    input_size=None,
    device: str = "cpu",
    rounds: int = 5,
    iters: int = 5,
    warmup: int = 2,
) -> dict[str, dict]:
    """Latency of several models measured side by side: `rounds` rounds, each timing every model in
    turn (median of `iters` passes), so that a change in the machine's load hits all of them alike.
    Per model {"ms": median over rounds, "min", "max", "rounds": [...]}, and per model after the
    first {"ratio": median of the per-round ratios to the first model, "ratio_min", "ratio_max"}."""
    names = list(models)
    per = {n: [] for n in names}
    for n in names:
        models[n].eval().to(device)
    for _ in range(rounds):
        for n in names:
            per[n].append(measure_latency(models[n], batch, input_size, device, warmup=warmup, iters=iters))
        warmup = 1
    out = {}
    for n in names:
        out[n] = {"ms": statistics.median(per[n]), "min": min(per[n]), "max": max(per[n]), "rounds": per[n]}
        if n != names[0]:
            ratios = [a / b for a, b in zip(per[n], per[names[0]])]
            out[n].update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
    return out


SCOPES = ("model", "attention")


@dataclass
class Budget:
    """What a rank rule may spend. The compressed sites are every attention (at `method` level) and,
    with `mlp` ("neurons", "lowrank"; True: "lowrank"), the MLPs. scope "model": the whole model may cost
    `ratio` x its dense params (or FLOPs with unit="flops"), everything that is not compressed counted
    as it is; scope "attention": the compressed sites together may cost `ratio` x their dense cost."""

    ratio: float = 0.5
    unit: str = "params"
    method: str = "head"
    mlp: bool | str = False
    scope: str = "attention"

    def __post_init__(self):
        require(
            isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1,
            f"the budget ratio must be in (0, 1], got {self.ratio}",
        )
        require(self.unit in ("params", "flops"), f"the budget counts 'params' or 'flops', got {self.unit!r}")
        require(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}")
        require(self.scope in SCOPES, f"the budget's scope is one of {SCOPES}, got {self.scope!r}")
        mlp_mode(self.mlp)

    def target(self, dense: nn.Module):
        """(cost_fn, target) of this budget for `dense` (budget_target)."""
        return budget_target(dense, self.on_sites(dense).ratio, self.unit, self.mlp)

    def on_sites(self, dense: nn.Module) -> "Budget":
        """The same budget as a fraction of the compressed sites' dense cost (scope "attention"): a
        whole-model ratio R is (R total - fixed) / sites, where fixed = total - sites is what stays dense."""
        if self.scope == "attention":
            return self
        layers = layer_params(dense) if self.unit == "params" else layer_flops(dense)
        total = model_params(dense) if self.unit == "params" else model_flops(dense)
        sites = sum(l["attn"] + (l["mlp"] if self.mlp else 0) for l in layers)
        fixed = total - sites
        if self.ratio * total <= fixed:
            raise ComcatError(
                f"{self.ratio:.0%} of the model's {self.unit} is below what stays dense "
                f"({fixed / total:.0%}: embeddings, norms, classifier"
                + ("" if self.mlp else ", MLPs")
                + ")"
                + (": raise the ratio" if self.mlp else ": compress the MLPs too (--mlp), or raise the ratio")
            )
        return replace(self, ratio=min(1.0, (self.ratio * total - fixed) / sites), scope="attention")


def budget_target(dense: nn.Module, ratio: float, budget: str, mlp):
    """(cost_fn, target): the compressed sites (attention, plus the MLPs when `mlp`) may cost at most
    `ratio` x their dense params or FLOPs; everything else is counted at its fixed cost."""
    if budget not in ("params", "flops"):
        raise ComcatError(f"budget must be 'params' or 'flops', got {budget!r}")
    if not 0 < ratio <= 1:
        raise ComcatError(f"the budget ratio must be in (0, 1], got {ratio}")
    cost_fn = (lambda cfg: model_params(dense, cfg)) if budget == "params" else (lambda cfg: model_flops(dense, cfg))
    layers = layer_params(dense) if budget == "params" else layer_flops(dense)
    sites_dense = sum(l["attn"] + (l["mlp"] if mlp else 0) for l in layers)
    return cost_fn, cost_fn(None) - (1 - ratio) * sites_dense


def check_budget(cost_fn, target: float, floor: RankConfig, budget: str = "params") -> None:
    """Refuse a target below the model with rank 1 at every searched site (`budget` names the unit)."""
    if cost_fn(floor) > target:
        amount = f"{target:,.0f} {budget}".strip()
        raise ComcatError(
            f"the budget ({amount}) is below the smallest possible model "
            f"({cost_fn(floor):,.0f} at rank 1 everywhere): raise the ratio"
        )
