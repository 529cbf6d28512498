"""COMCAT adapters vs LoRA (peft), Custom Diffusion and full fine-tuning (DreamBooth), side by side.

    python benchmarks/diffusion_customization.py [--arch sd15|embedded|both|sdxl|sd3|flux|today]
        [--steps 300] [--interleave N] [--json F]

For each method: trainable parameters, file bytes (fp16 and fp32), training step time and peak
memory (each method runs in its own process: CPU peak RSS, or CUDA max allocated), measured in
one run. On CUDA every method trains in bf16 mixed precision (frozen weights bf16, trained fp32);
`--cuda-graph` times replays of each method's whole training step captured as one CUDA graph.
  sd15      the Stable Diffusion 1.5 UNet architecture (benchmarks/configs/sd15_unet.json), random
            weights (fine for size and time), 64x64 latents, a 77x768 text context, batch --sd-batch.
  embedded  the bundled shapes model, trained on assets/examples/heart with captions 'a V* in
            {colour}' for --steps steps, every method also learning the V* embedding row (as
            `customize` does by default); the quality of point 5 is added: for 'a V* in {colour}' over
            all colours, the share judged a heart by the embedded ViT and the share of the right colour.
  sdxl, sd3, flux (today: all three)
            SDXL's UNet, SD3-medium's and FLUX.1-dev's transformers at their real widths and heads
            (benchmarks/configs/), random weights, with fewer layers unless --full-depth (the
            per-attention sizes and the ratios of step times do not depend on depth): SDXL's 1+2+2
            transformer layers per block instead of 1+2+10, SD3's 2 joint blocks of 24, Flux's 1
            double-stream and 2 single-stream blocks of 19 + 38. --latent 64 (512 px): 64x64x4
            latents and 77x2048 context (SDXL), 1024 + 154 tokens (SD3), 1024 + 512 tokens (Flux);
            flow-matching loss on the transformers. LoRA r4 targets every attention projection
            (the context stream's too). comcat-s4x: comcat-s4 on cross-attention only (SDXL).
            --interleave N: file sizes and step times, all methods in one process, one step of
            each per round for N rounds, with each round's ratio to lora-r4 (the machine's drift
            cancels) and a sign test of the rounds comcat was faster in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

METHODS = {  # name -> (kind, rank, lr on the embedded model)
    "comcat-r1": ("comcat", 1, 2.5e-3),
    "comcat-r2": ("comcat", 2, 2.5e-3),
    "comcat-s4": ("comcat-shared", 4, 2.5e-3),  # heads share a rank-4 basis (AdapterConfig.shared_basis)
    "comcat-s4x": ("comcat-shared-cross", 4, 2.5e-3),  # the same on cross-attention only (UNets)
    "lora-r4": ("lora", 4, 1e-3),
    "custom-diffusion": ("custom", None, 1e-4),
    "full-ft": ("full", None, 5e-5),
}


def inject(kind: str, rank: int | None, pipe_or_unet) -> list[torch.nn.Parameter]:
    """Make the method's parameters trainable (everything else frozen); return them."""
    from comcat.customization.adapter import AdapterConfig, add_adapter

    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    unet.requires_grad_(False)
    if kind.startswith("comcat"):
        targets = ("cross",) if kind.endswith("cross") else ("self", "cross")
        return add_adapter(unet, AdapterConfig(rank=rank, shared_basis="shared" in kind, targets=targets))
    if kind == "lora":
        from peft import LoraConfig

        joint = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"] if not hasattr(unet, "conv_in") else []
        unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"] + joint,
            )
        )
        return [p for p in unet.parameters() if p.requires_grad]
    if kind == "custom":  # Custom Diffusion: the cross-attention key and value projections
        params = [p for n, p in unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]
    else:
        params = list(unet.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def skipped(method: str, arch: str) -> bool:
    """Methods an architecture has nothing for: Custom Diffusion is timed on SD-1.5 and the embedded
    model only; cross-attention-only adapters need cross-attention, which SD3 and Flux do not have."""
    kind = METHODS[method][0]
    return (arch in SHAPED and kind == "custom") or (arch in ("sd3", "flux") and kind.endswith("cross"))


def file_bytes(params: list[torch.nn.Parameter], dtype: torch.dtype, write: bool) -> int:
    """Bytes of a safetensors file holding `params` in `dtype` (written and measured when `write`)."""
    from safetensors.torch import save_file

    if not write:
        return sum(p.numel() for p in params) * torch.finfo(dtype).bits // 8
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "weights.safetensors"
        save_file({f"p{i}": p.detach().to(dtype).contiguous() for i, p in enumerate(params)}, str(path))
        return path.stat().st_size


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(run, steps: int, warmup: int, device: str) -> list[float]:
    """Seconds of each of `steps` calls of `run` after `warmup` untimed ones (CUDA synchronized)."""
    cuda, times = device.startswith("cuda"), []
    for i in range(steps + warmup):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def figures(method: str, params: list, times: list[float], device: str, **extra) -> dict:
    """One method's row: trainable parameters, file bytes, the median step time, peak memory."""
    n = sum(p.numel() for p in params)
    small = n < 50_000_000
    return dict(
        method=method,
        params=n,
        fp16_bytes=file_bytes(params, torch.float16, small),
        fp32_bytes=file_bytes(params, torch.float32, small),
        written=small,
        step_s=sorted(times)[len(times) // 2],
        step_s_all=[round(x, 3) for x in times],
        peak_mb=peak_memory_mb(device),
        **extra,
    )


def config_model(name: str, **over):
    """A random-init diffusers model of benchmarks/configs/NAME.json (a real model's config), with
    `over` replacing its entries (fewer layers)."""
    import diffusers

    cfg = json.loads((ROOT / "benchmarks/configs" / f"{name}.json").read_text())
    cls = getattr(diffusers, cfg["_class_name"])
    return cls(**{k: v for k, v in cfg.items() if not k.startswith("_")} | over)


def run_sd15(method: str, steps: int, device: str, precision: str, graph: bool = False, batch: int = 1) -> dict:
    """Median step time of `steps` timed steps after warm-up, in fp32 or in bf16 mixed precision as
    diffusers' training scripts do it: frozen weights in bf16, trained ones in fp32, bf16 autocast.
    `graph` (CUDA): the whole step (noise, forward, backward, AdamW) is captured once as a CUDA graph
    and replayed, so the time is the GPU's work without Python's kernel-launch overhead."""
    from diffusers import DDPMScheduler

    from comcat.customization.diffusion.concept import denoising_loss

    kind, rank, _ = METHODS[method]
    cuda, bf16 = device.startswith("cuda"), precision == "bf16"
    if graph and not cuda:
        raise SystemExit("--cuda-graph needs --device cuda")
    torch.manual_seed(0)
    with torch.device(device):
        unet = config_model("sd15_unet")
    params = inject(kind, rank, unet)
    if bf16:
        unet.to(torch.bfloat16)
        for p in params:
            p.data = p.data.float()
    # a captured graph must not rely on autocast's weight cache (it is cleared when the context exits)
    amp = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=not graph)
        if bf16
        else contextlib.nullcontext()
    )
    opt = torch.optim.AdamW(params, lr=1e-5, **(dict(capturable=True, foreach=True) if graph else {}))
    sched = DDPMScheduler()
    z0 = torch.randn(batch, 4, 64, 64, device=device)
    ctx = torch.randn(batch, 77, 768, device=device)

    def step():
        with amp:
            loss = denoising_loss(unet, sched, z0, ctx).mean()
        loss.backward()
        opt.step()

    warmup = 3 if cuda else 1
    if graph:  # PyTorch's whole-network capture: warm up on a side stream, grads None at capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                opt.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        run, warmup = captured.replay, 1
    else:

        def run():
            opt.zero_grad(set_to_none=True)
            step()

    times = timed(run, steps, warmup, device)
    mode = "bf16 autocast, frozen weights bf16" if bf16 else "fp32"
    return figures(method, params, times, device, precision=mode + (", CUDA graph" if graph else ""), batch=batch)


SHAPED = {  # arch -> (config file, the layers kept without --full-depth)
    "sdxl": ("sdxl_unet", {"transformer_layers_per_block": [1, 2, 2]}),
    "sd3": ("sd3_transformer", {"num_layers": 2}),
    "flux": ("flux_transformer", {"num_layers": 1, "num_single_layers": 2}),
}


def shaped_model(arch: str, full_depth: bool, device: str, batch: int, latent: int):
    """(model, forward(noisy latents, t in [0, 1]) -> prediction, clean latents) for an
    SDXL/SD3/Flux-shaped config (module docstring)."""
    name, cut = SHAPED[arch]
    with torch.device(device):
        model = config_model(name, **({} if full_depth else cut))
        if arch == "sdxl":
            x0, ctx = torch.randn(batch, 4, latent, latent), torch.randn(batch, 77, 2048)
            cond = {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.ones(batch, 6)}
            return model, lambda x, t: model(x, t * 1000, ctx, added_cond_kwargs=cond).sample, x0
        if arch == "sd3":
            x0, ctx = torch.randn(batch, 16, latent, latent), torch.randn(batch, 154, 4096)
            pooled = torch.randn(batch, 2048)
            return model, lambda x, t: model(x, ctx, pooled, t * 1000).sample, x0
        n = (latent // 2) ** 2  # Flux packs 2x2 patches of 16-channel latents: 64 channels per token
        x0, ctx, pooled = torch.randn(batch, n, 64), torch.randn(batch, 512, 4096), torch.randn(batch, 768)
        side = torch.arange(latent // 2, dtype=torch.float32)
        grid = torch.stack(torch.meshgrid(torch.zeros(1), side, side, indexing="ij"), -1).reshape(-1, 3)
        txt, guidance = torch.zeros(512, 3), torch.full((batch,), 3.5)
        return model, lambda x, t: model(x, ctx, pooled, t, grid, txt, guidance).sample, x0


def shaped_step(method: str, arch: str, device: str, precision: str, batch: int, latent: int, full_depth: bool):
    """(trainable params, one training step, the model's parameter count) of `method` on an
    SDXL/SD3/Flux-shaped model: noise prediction on SDXL's UNet, flow matching (predict noise - x0
    at x_t = (1 - t) x0 + t noise) on the transformers."""
    kind, rank, _ = METHODS[method]
    torch.manual_seed(0)
    model, forward, x0 = shaped_model(arch, full_depth, device, batch, latent)
    params = inject(kind, rank, model)
    bf16 = precision == "bf16"
    if bf16:
        model.to(torch.bfloat16)
        for p in params:
            p.data = p.data.float()
    amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    opt = torch.optim.AdamW(params, lr=1e-5)

    def run():
        opt.zero_grad(set_to_none=True)
        noise, t = torch.randn_like(x0), torch.rand(len(x0), device=x0.device)
        tt = t.view(-1, *[1] * (x0.ndim - 1))
        target = noise if arch == "sdxl" else noise - x0
        with amp:
            loss = (forward((1 - tt) * x0 + tt * noise, t).float() - target).square().mean()
        loss.backward()
        opt.step()

    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return params, run, frozen + sum(p.numel() for p in params)


def run_shaped(
    method: str, arch: str, steps: int, device: str, precision: str, batch: int, latent: int, full_depth: bool
) -> dict:
    """As run_sd15, on an SDXL/SD3/Flux-shaped model (shaped_step)."""
    params, run, total = shaped_step(method, arch, device, precision, batch, latent, full_depth)
    return figures(
        method,
        params,
        timed(run, steps, 1, device),  # the first step warms up
        device,
        precision="bf16 autocast, frozen weights bf16" if precision == "bf16" else "fp32",
        batch=batch,
        latent=latent,
        depth="full" if full_depth else "cut",
        model_params=total,
    )


def sign_test(wins: int, n: int) -> float:
    """P(at least `wins` of `n` rounds faster) if faster and slower were equally likely: one-sided."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def interleaved(methods: list[str], arch: str, rounds: int, device: str, precision: str, shape: tuple) -> dict:
    """Step times of `methods` on one shaped model each, in one process, one step of every method per
    round (after a warm-up round), so that drift of the machine's speed hits all alike. Per method:
    the median step and, against lora-r4 in the same rounds, the median and range of the ratios."""
    built = {m: shaped_step(m, arch, device, precision, *shape) for m in methods}
    steps = {m: run for m, (_, run, _) in built.items()}
    times = {m: [] for m in methods}
    for r in range(rounds + 1):
        for m, run in steps.items():
            t = timed(run, 1, 0, device)[0]
            if r:
                times[m].append(t)
    out = {}
    for m, ts in times.items():
        ratios = sorted(a / b for a, b in zip(ts, times["lora-r4"]))
        faster = sum(r < 1 for r in ratios)
        params = built[m][0]
        out[m] = {
            "params": sum(p.numel() for p in params),
            "fp16_bytes": file_bytes(params, torch.float16, write=True),
            "step_s": statistics.median(ts),
            "step_s_all": [round(t, 3) for t in ts],
            "vs_lora_r4": statistics.median(ratios),
            "vs_lora_r4_range": [ratios[0], ratios[-1]],
            "faster_rounds": faster,
            "sign_test_p": sign_test(faster, rounds),
        }
        print(
            f"{arch} {m:12} file {out[m]['fp16_bytes'] / 1e6:.2f} MB fp16, step {out[m]['step_s']:.3f} s "
            f"(median of {rounds}); / lora-r4 in the same round: "
            f"median {out[m]['vs_lora_r4']:.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}, faster in {faster} of "
            f"{rounds} rounds (one-sided sign test p = {out[m]['sign_test_p']:.3f})",
            flush=True,
        )
    return out


def run_embedded(method: str, steps: int, device: str, seed: int = 0) -> dict:
    from diffusers import DDPMScheduler

    from comcat.compression.load import load_model
    from comcat.core.loop import seed_step
    from comcat.customization.adapter.model import train_token_row
    from comcat.customization.diffusion.concept import (
        denoising_loss,
        encode_images,
        encode_text,
        read_concept,
        resolution,
    )
    from comcat.customization.diffusion.pipeline import load_pipeline
    from comcat.customization.diffusion.quality import concept_quality

    kind, rank, lr = METHODS[method]
    pipe = load_pipeline("embedded", device=device)
    classifier = load_model("embedded").model.to(device)
    before = concept_quality(pipe, classifier, seed=seed) if method == "comcat-r1" else None
    pixels, captions = read_concept(ROOT / "assets/examples/heart", "a V* in red", "V*", resolution(pipe))
    latents = torch.cat([encode_images(pipe, pixels), encode_images(pipe, pixels.flip(3))])
    captions = captions * 2
    torch.manual_seed(seed)
    params = inject(kind, rank, pipe)
    embedding, _ = train_token_row(pipe, "V*")
    opt = torch.optim.AdamW(params + [embedding], lr=lr, weight_decay=0.0)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    times, losses = [], []
    for step in range(1, steps + 1):
        seed_step(seed, step)
        t0 = time.perf_counter()
        idx = torch.randint(len(latents), (4,))
        context = encode_text(pipe, [captions[i] for i in idx.tolist()])
        loss = denoising_loss(pipe.unet, sched, latents[idx], context).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    n = sum(p.numel() for p in params)
    after = concept_quality(pipe, classifier, seed=seed)
    return dict(
        method=method,
        params=n,
        fp16_bytes=file_bytes(params, torch.float16, True),
        fp32_bytes=file_bytes(params, torch.float32, True),
        written=True,
        step_s=sorted(times)[len(times) // 2],
        peak_mb=peak_memory_mb(device),
        lr=lr,
        steps=steps,
        train_s=round(sum(times), 1),
        first_loss=sum(losses[:20]) / 20,
        last_loss=sum(losses[-20:]) / 20,
        heart=after["shape"],
        colour=after["colour"],
        both=after["both"],
        heart_before=None if before is None else before["shape"],
    )


def mb(b: int) -> str:
    return f"{b / 1e6:,.2f}"


def table(arch: str, rows: list[dict]) -> str:
    head = "| method | trainable params | file MB fp16 | file MB fp32 | step s | peak MB |"
    lines = [
        f"### {arch}",
        "",
        head + (" heart % | colour % |" if arch == "embedded" else ""),
        "|" + "---|" * (8 if arch == "embedded" else 6),
    ]
    for r in rows:
        line = (
            f"| {r['method']} | {r['params']:,} | {mb(r['fp16_bytes'])} | {mb(r['fp32_bytes'])} | "
            f"{r['step_s']:.3f} | {r['peak_mb']:,.0f} |"
        )
        if arch == "embedded":
            line += f" {100 * r['heart']:.0f} | {100 * r['colour']:.0f} |"
        lines.append(line)
    by = {r["method"]: r for r in rows}
    for ours in ("comcat-r1", "comcat-s4"):
        if {ours, "lora-r4"} <= set(by):
            c, lo = by[ours], by["lora-r4"]
            line = f"{ours} / lora-r4: step time {c['step_s'] / lo['step_s']:.2f}, "
            line += f"file {c['params'] / lo['params']:.2f}"
            line += f", step time / full-ft {c['step_s'] / by['full-ft']['step_s']:.2f}" if "full-ft" in by else ""
            lines += ["", line]
    if arch == "embedded" and by.get("comcat-r1", {}).get("heart_before") is not None:
        lines.append(
            f"before training: {100 * by['comcat-r1']['heart_before']:.0f}% of 'a V* in {{colour}}' samples are hearts"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("sd15", "embedded", "both", *SHAPED, "today"), default="both")
    ap.add_argument("--latent", type=int, default=64, help="sdxl/sd3/flux latent side (default 64: 512 px)")
    ap.add_argument("--full-depth", action="store_true", help="sdxl/sd3/flux with all their layers")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=300, help="embedded training steps (default 300)")
    ap.add_argument(
        "--sd-steps",
        type=int,
        default=2,
        help="timed SD-1.5 steps after warm-up (1 step on the CPU, 3 on CUDA; default 2)",
    )
    ap.add_argument("--sd-batch", type=int, default=1, help="SD-1.5 batch size (default 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="SD-1.5 runs: bf16 mixed precision or fp32 (auto: bf16 on CUDA, fp32 on the CPU)",
    )
    ap.add_argument(
        "--cuda-graph",
        action="store_true",
        help="SD-1.5 on CUDA: capture each method's whole training step as a CUDA graph and time "
        "its replays (the GPU's work, without Python's launch overhead at batch 1)",
    )
    ap.add_argument(
        "--interleave",
        type=int,
        default=0,
        help="sdxl/sd3/flux: file sizes and step times, every method in one process, one step each per round, "
        "for N rounds (ratios to lora-r4 round by round)",
    )
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print its row
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1)) if args.device == "cpu" else None
    from comcat.customization.customize import resolve_precision

    precision = resolve_precision(args.precision, args.device)
    if args.one:
        arch, method = args.one.split(":")
        if arch in SHAPED:
            shape = (args.sd_batch, args.latent, args.full_depth)
            row = run_shaped(method, arch, args.sd_steps, args.device, precision, *shape)
        elif arch == "sd15":
            row = run_sd15(method, args.sd_steps, args.device, precision, args.cuda_graph, args.sd_batch)
        else:
            row = run_embedded(method, args.steps, args.device)
        print("ROW " + json.dumps(row))
        return
    archs = {"both": ("sd15", "embedded"), "today": tuple(SHAPED)}.get(args.arch, (args.arch,))
    results = {}
    if args.interleave:
        methods = [m for m in args.methods.split(",") if METHODS[m][0].startswith(("comcat", "lora"))]
        methods = methods if "lora-r4" in methods else methods + ["lora-r4"]
        shape = (args.sd_batch, args.latent, args.full_depth)
        for arch in archs:
            if arch not in SHAPED:
                raise SystemExit("--interleave times the sdxl, sd3 and flux shapes")
            ok = [m for m in methods if not skipped(m, arch)]
            results[arch] = interleaved(ok, arch, args.interleave, args.device, precision, shape)
    for arch in () if args.interleave else archs:
        rows = []
        for method in args.methods.split(","):
            if skipped(method, arch):
                continue
            cmd = [
                sys.executable,
                __file__,
                "--one",
                f"{arch}:{method}",
                "--steps",
                str(args.steps),
                "--sd-steps",
                str(args.sd_steps),
                "--device",
                args.device,
                "--precision",
                precision,
            ]
            cmd += ["--sd-batch", str(args.sd_batch)] + (["--cuda-graph"] if args.cuda_graph else [])
            cmd += ["--latent", str(args.latent)] + (["--full-depth"] if args.full_depth else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
            if line is None:
                print(f"{arch} {method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(line[4:]))
            print(f"{arch} {method}: {rows[-1]}", flush=True)
        results[arch] = rows
        print(table(arch, rows), flush=True)
    if args.json:
        from comcat.core.files import atomic_write_text

        meta = dict(device=args.device, cuda_graph=args.cuda_graph, sd_batch=args.sd_batch, torch=torch.__version__)
        meta |= dict(latent=args.latent, full_depth=args.full_depth, precision=precision)
        atomic_write_text(
            args.json, json.dumps(dict(results, **meta, threads=torch.get_num_threads()), indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
