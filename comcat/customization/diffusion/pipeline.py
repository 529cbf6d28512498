"""`ShapesPipeline`: text-to-image sampling for a pixel-space `UNet2DConditionModel`, and
`load_pipeline(spec)`: the embedded model, a hub ID or a local diffusers folder, all through
`from_pretrained`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from ...core.embedded import ASSETS
from ...core.errors import ComcatError, first_line
from .shapes_t2i import GUIDANCE

EMBEDDED_PIPELINE = ASSETS / "shapes_t2i"


def guidance_kwargs(guidance: float | None) -> dict:
    """Pipeline call arguments for classifier-free guidance; None leaves the pipeline's own default."""
    return {} if guidance is None else {"guidance_scale": guidance}


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(B, L) token ids, padded or cut to the text encoder's length L."""
    return tokenizer(
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


class ShapesPipeline(DiffusionPipeline):
    """Classifier-free-guided sampling in pixel space.

    The UNet works on images packed into `pack` x `pack` pixel blocks (`F.pixel_unshuffle`),
    x in [-1, 1]; eps_hat = eps(x, t, "") + g * (eps(x, t, c) - eps(x, t, "")).
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, scheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    @property
    def pack(self) -> int:
        return int(round((self.unet.config.in_channels / 3) ** 0.5))

    def pack_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the UNet's sample (B, 3 p^2, H/p, W/p)."""
        return F.pixel_unshuffle(x, self.pack) if self.pack > 1 else x

    def unpack(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.pack) if self.pack > 1 else z

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) last hidden states of the text encoder: the UNet's cross-attention context."""
        ids = tokenize(self.tokenizer, prompts).to(self.text_encoder.device)
        return self.text_encoder(ids).last_hidden_state.to(self.unet.dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = GUIDANCE,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        negative_prompt: str = "",
        output_type: str = "pil",
        cross_attention_kwargs=None,
        callback=None,
        return_dict: bool = True,
        eta: float = 0.0,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        context = self.encode_prompt(prompts)
        guided = guidance_scale > 1.0
        if guided:
            context = torch.cat([self.encode_prompt([negative_prompt] * n), context])
        size = self.unet.config.sample_size
        shape = (n, self.unet.config.in_channels, size, size)
        sample = torch.randn(shape, generator=generator, device="cpu").to(self.unet.device, self.unet.dtype)
        self.scheduler.set_timesteps(num_inference_steps)
        sample = sample * self.scheduler.init_noise_sigma
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = torch.cat([sample] * 2) if guided else sample
            eps = self.unet(model_in, t, context, cross_attention_kwargs=cross_attention_kwargs).sample
            if guided:
                uncond, cond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            extra = (
                {"eta": eta, "generator": generator}
                if "eta" in inspect.signature(self.scheduler.step).parameters
                else {}
            )
            sample = self.scheduler.step(eps, t, sample, **extra).prev_sample
            if callback is not None:
                callback(i, t)
        if not torch.isfinite(sample).all():
            raise ComcatError(
                "sampling produced NaN/inf values: a loaded adapter or the model is broken "
                "(retrain it, lower its strength, or generate without it)"
            )
        images = self.unpack(sample.float()).clamp(-1, 1)
        if output_type == "pt":
            out = images
        else:
            arr = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
            out = arr if output_type == "np" else [Image.fromarray(a) for a in arr]
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def load_pipeline(spec: str = "embedded", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """`embedded`, a local diffusers folder or a hub ID ('hub:ID': never a local folder) -> a
    pipeline on `device`.

    A folder saved from `ShapesPipeline` loads as one; anything else goes through
    `DiffusionPipeline.from_pretrained` (Stable Diffusion 1.x/2.x and the like).
    """
    hub_only = spec.startswith("hub:")
    spec = spec.removeprefix("hub:")
    source = EMBEDDED_PIPELINE if spec == "embedded" else Path(spec)
    index = source / "model_index.json"
    if hub_only and source.exists():  # from_pretrained would read it as a folder
        raise ComcatError(
            f"could not load pipeline {spec!r} from the hub: give 'embedded' or a hub ID reachable from this machine"
        )
    if source.is_dir() and not index.is_file():
        raise ComcatError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
    local = index.is_file()
    cls = (
        ShapesPipeline
        if local and json.loads(index.read_text()).get("_class_name") == "ShapesPipeline"
        else DiffusionPipeline
    )
    try:
        pipe = cls.from_pretrained(str(source) if local else spec, dtype=dtype)
    except (OSError, ValueError) as e:  # unreachable, missing files, or a folder missing a component
        first = first_line(e, 10_000)
        raise ComcatError(
            f"could not load pipeline {spec!r} ({first}); give 'embedded', a local "
            "diffusers folder, or a hub ID reachable from this machine"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
