"""Cost of one rank-search step vs a dense forward/backward, on the deit_small_patch16_224 architecture.

  dense      forward + backward of the dense model (CE loss)
  search     COMCAT's step: the full-rank head-level model with one soft rank mask per site
             (U diag(s * c) V^T), forward + backward of CE * (cost/target)^beta, gradients for the
             logits and the weights
  explicit   the same mixture formed literally: every site computes each of its K candidate
             truncations separately and mixes the K outputs (QK candidates mix logits, VO candidates
             mix outputs), forward + backward
The masked and explicit models are checked to give the same output for the same Gumbel sample.
Random weights (no download); times are medians over --iters steps on this machine's CPU.

    python benchmarks/search_cost.py [--batch 8] [--candidates 8] [--iters 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from comcat.compression.convert import compress
from comcat.compression.cost import budget_target, model_params
from comcat.compression.lowrank import HeadLowRankAttention, LowRankLinear
from comcat.compression.models import build_arch
from comcat.compression.rank_rules import full_ranks
from comcat.compression.search import RankSearch, budget_penalty


class ExplicitLinear(nn.Module):
    """sum_i m_i up_{:r_i}(down_{:r_i}(x)): one truncated layer per candidate."""

    def __init__(self, lin: LowRankLinear, ranks: list[int]):
        super().__init__()
        self.lin, self.ranks, self.m = lin, ranks, None

    def forward(self, x):
        w_down, w_up = self.lin.down.weight, self.lin.up.weight
        y = sum(self.m[i] * F.linear(F.linear(x, w_down[:r]), w_up[:, :r]) for i, r in enumerate(self.ranks))
        return y + self.lin.up.bias


class ExplicitHeadAttention(nn.Module):
    """Per head: logits = sum_i m_i scale (X A_{:r_i} + a_{:r_i})(X B_{:r_i})^T;
    out = sum_j m'_j P_j (X P_{:r_j}) R_{:r_j}^T."""

    def __init__(self, attn: HeadLowRankAttention, ranks_qk: list[int], ranks_vo: list[int]):
        super().__init__()
        self.a, self.ranks_qk, self.ranks_vo, self.m_qk, self.m_vo = attn, ranks_qk, ranks_vo, None, None

    def forward(self, x, attn_mask=None, is_causal=False):
        a, C, H = self.a, x.shape[-1], self.a.num_heads
        wq, wk = (w.reshape(H, a.rank_qk, C) for w in (a.q.weight, a.k.weight))
        wv, wo = a.v.weight.reshape(H, a.rank_vo, C), a.proj.weight.reshape(C, H, a.rank_vo)
        bq = a.q.bias.reshape(H, 1, a.rank_qk) if a.q.bias is not None else x.new_zeros(H, 1, a.rank_qk)
        logits = 0
        for i, r in enumerate(self.ranks_qk):
            q = torch.einsum("bnc,hrc->bhnr", x, wq[:, :r]) + bq[..., :r]
            k = torch.einsum("bnc,hrc->bhnr", x, wk[:, :r])
            logits = logits + self.m_qk[i] * a.scale * q @ k.transpose(-1, -2)
        attn = logits.softmax(-1)
        out = a.proj.bias
        for j, r in enumerate(self.ranks_vo):
            v = torch.einsum("bnc,hrc->bhnr", x, wv[:, :r])
            out = out + self.m_vo[j] * torch.einsum("bhnr,chr->bnc", attn @ v, wo[:, :, :r])
        return out


def step_time(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args()
    torch.manual_seed(0)
    dense = build_arch(args.arch).train()
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, dense.num_classes, (args.batch,))
    cost_fn, target = budget_target(dense, 0.5, "params", mlp=True)

    full = compress(dense, full_ranks(dense, "head", mlp=True)).train()
    search = RankSearch(full, cost_fn, args.candidates)
    explicit = compress(dense, full_ranks(dense, "head", mlp=True)).train()
    explicit.load_state_dict(full.state_dict())
    choices = list(search.choices.values())
    it = iter(choices)
    for b in explicit.blocks:
        c_qk, c_vo = next(it), next(it)
        b.attn = ExplicitHeadAttention(b.attn, c_qk.ranks.tolist(), c_vo.ranks.tolist())
        for fc in ("fc1", "fc2"):
            setattr(b.mlp, fc, ExplicitLinear(getattr(b.mlp, fc), next(it).ranks.tolist()))
    explicit_sites = [
        s for b in explicit.blocks for s in ((b.attn, "m_qk"), (b.attn, "m_vo"), (b.mlp.fc1, "m"), (b.mlp.fc2, "m"))
    ]

    def sample(tau=1.0):
        """One Gumbel sample per site, installed as a soft mask (search) and as weights (explicit)."""
        cost = torch.tensor(search.const, dtype=torch.float64)
        for (module, attr), (owner, name), unit, c in zip(search.sites, explicit_sites, search.units, choices):
            mask, m = c(tau)
            setattr(module, attr, mask)
            setattr(owner, name, m)
            cost = cost + unit * (m.double() * c.ranks.double()).sum()
        return cost

    with torch.no_grad():
        sample()
        a, b = full(x[:2]), explicit(x[:2])
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(f"masked vs explicit mixture, same sample: max rel. difference {err:.1e}")
    assert err < 1e-4

    def dense_step():
        dense.zero_grad(set_to_none=True)
        F.cross_entropy(dense(x), y).backward()

    def search_step():
        full.zero_grad(set_to_none=True)
        search.zero_grad(set_to_none=True)
        cost = sample()
        budget_penalty(F.cross_entropy(full(x), y), cost, target).backward()

    def search_step_distill():  # what search_ranks runs by default: + the dense teacher's forward
        full.zero_grad(set_to_none=True)
        search.zero_grad(set_to_none=True)
        cost = sample()
        with torch.no_grad():
            p_teacher = F.log_softmax(dense(x), -1)
        logits = full(x)
        task = F.cross_entropy(logits, y) + F.kl_div(
            F.log_softmax(logits, -1), p_teacher, log_target=True, reduction="batchmean"
        )
        budget_penalty(task, cost, target).backward()

    def explicit_step():
        explicit.zero_grad(set_to_none=True)
        search.zero_grad(set_to_none=True)
        cost = sample()
        budget_penalty(F.cross_entropy(explicit(x), y), cost, target).backward()

    t_dense, t_search, t_distill, t_explicit = (
        step_time(f, args.iters) for f in (dense_step, search_step, search_step_distill, explicit_step)
    )
    print(
        f"{args.arch}, batch {args.batch}, {args.candidates} candidates per site, {len(choices)} sites, "
        f"{torch.get_num_threads()} CPU threads; dense params {model_params(dense):,}"
    )
    print(f"{'step':28} {'s/step':>8} {'vs dense':>9}")
    rows = (
        ("dense forward+backward", t_dense),
        ("search step (soft mask)", t_search),
        ("  + teacher forward (KL)", t_distill),
        ("explicit K-candidate mixture", t_explicit),
    )
    for name, t in rows:
        print(f"{name:28} {t:>8.3f} {t / t_dense:>8.2f}x")
    print(
        f"search step is {t_search / t_dense:.2f}x a dense step (goal <= 1.5x) and "
        f"{t_explicit / t_search:.1f}x cheaper than the explicit mixture (goal >= 3x)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "arch": args.arch,
                    "batch": args.batch,
                    "candidates": args.candidates,
                    "sites": len(choices),
                    "max_rel_diff": err,
                    "seconds": {n.strip(): t for n, t in rows},
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
