"""What training an adapter needs from each family of text-to-image pipeline: the prompts'
conditioning, the images' latents, and the loss.

  SD 1.x/2.x, the embedded model  one text encoder; noise (or v) prediction at t ~ U{0..T-1}
  SDXL                            two text encoders, pooled text and size ids; noise prediction
  SD3 / SD3.5                     three text encoders and pooled text; flow matching
  Flux                            CLIP pooled text and T5 tokens; flow matching on 2x2-packed latents

Flow matching: x_s = (1 - s) x_0 + s eps with s ~ U(0, 1); the model predicts eps - x_0.
Only the first family learns a new token: the others read a prompt through several text encoders,
each with its own vocabulary, so their adapters learn the concept under a word the tokenizers know.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.errors import ComcatError
from .concept import denoising_loss, encode_images, encode_text


def family(pipe) -> str:
    """'flux', 'sd3', 'sdxl' or 'sd' (SD 1.x/2.x, the embedded model)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        name = type(transformer).__name__
        return "flux" if name.startswith("Flux") else "sd3" if name.startswith("SD3") else name
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def cat_conditions(conds: list[dict]) -> dict:
    """Batch-first conditionings (tensors, or dicts of them) concatenated along the batch."""
    return {
        k: cat_conditions([c[k] for c in conds]) if isinstance(v, dict) else torch.cat([c[k] for c in conds])
        for k, v in conds[0].items()
    }


class Denoiser:
    """SD 1.x/2.x and the embedded model: context = the text encoder's hidden states (with the
    learned token's gradient), DDPM noise or v prediction."""

    learns_token = True

    def __init__(self, pipe):
        from diffusers import DDPMScheduler

        self.pipe = pipe
        self.model = pipe.unet
        self.sched = DDPMScheduler.from_config(pipe.scheduler.config)

    def condition(self, prompts: list[str]) -> dict:
        return {"context": encode_text(self.pipe, prompts)}

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> the model's clean sample x_0."""
        return encode_images(self.pipe, pixels)

    def random_latents(self, n: int, latent: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The latents of n images of uniform noise in [-1, 1], latent x latent before any packing."""
        size = latent * getattr(self.pipe, "vae_scale_factor", 8)
        return self.latents(torch.rand(n, 3, size, size, generator=generator) * 2 - 1)

    def loss(self, z0: torch.Tensor, cond: dict) -> torch.Tensor:
        """Per-sample loss (B,)."""
        return denoising_loss(self.model, self.sched, z0, cond["context"])


class SDXL(Denoiser):
    """Both text encoders' hidden states, the pooled text and the size ids (original size, crop
    (0, 0), target size: the training resolution)."""

    learns_token = False

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> dict:
        pipe = self.pipe
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=self.model.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        size = pipe.default_sample_size * pipe.vae_scale_factor
        ids = torch.tensor([size, size, 0, 0, size, size], dtype=embeds.dtype, device=embeds.device)
        return {"context": embeds, "added": {"text_embeds": pooled, "time_ids": ids.repeat(len(prompts), 1)}}

    def loss(self, z0, cond):
        t = torch.randint(0, self.sched.config.num_train_timesteps, (len(z0),), device=z0.device)
        noise = torch.randn_like(z0)
        zt = self.sched.add_noise(z0, noise, t)
        target = noise if self.sched.config.prediction_type == "epsilon" else self.sched.get_velocity(z0, noise, t)
        pred = self.model(zt, t, cond["context"], added_cond_kwargs=cond["added"]).sample
        return F.mse_loss(pred.float(), target.float(), reduction="none").mean(tuple(range(1, z0.ndim)))


class FlowMatching(Denoiser):
    """SD3: the joint transformer on VAE latents shifted and scaled, flow matching."""

    learns_token = False

    def __init__(self, pipe):
        self.pipe, self.model = pipe, pipe.transformer

    @torch.no_grad()
    def condition(self, prompts: list[str]) -> dict:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.model.device, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    @torch.no_grad()
    def latents(self, pixels):
        vae = self.pipe.vae
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def predict(self, xs: torch.Tensor, s: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.model(hidden_states=xs, timestep=s * 1000, **cond).sample

    @torch.no_grad()
    def fixed_prediction(self, prompts: list[str], latent: int = 8, seed: int = 3) -> torch.Tensor:
        """The prediction for `prompts` on seeded random images' latents (latent x latent) at noise
        levels spread over (0, 1): the same inputs on every call, to compare two models' outputs."""
        gen = torch.Generator().manual_seed(seed)
        z0 = self.random_latents(len(prompts), latent, gen)
        s = ((torch.arange(len(prompts)) + 0.5) / len(prompts)).to(z0)
        xs = self.noised(z0, s, torch.randn(z0.shape, generator=gen).to(z0))
        return self.predict(xs, s, self.condition(prompts))

    @staticmethod
    def noised(z0: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_s = (1 - s) z0 + s noise, for s (B,) in [0, 1]."""
        ss = s.view(-1, *[1] * (z0.ndim - 1))
        return (1 - ss) * z0 + ss * noise

    def loss(self, z0, cond):
        s = torch.rand(len(z0), device=z0.device)
        noise = torch.randn_like(z0)
        pred = self.predict(self.noised(z0, s, noise), s, cond)
        return F.mse_loss(pred.float(), (noise - z0).float(), reduction="none").mean(tuple(range(1, z0.ndim)))


class Flux(FlowMatching):
    """Flux: latents packed into 2x2 patches (B, H/2 W/2, 4C) with their (0, row, col) ids, T5
    tokens with zero ids, the pooled CLIP text, and the guidance input of guidance-distilled models
    at the pipeline's default 3.5."""

    GUIDANCE = 3.5

    @torch.no_grad()
    def condition(self, prompts):
        embeds, pooled, text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.model.device)
        self.txt_ids = text_ids
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    @torch.no_grad()
    def latents(self, pixels):
        z = super().latents(pixels)
        b, c, h, w = z.shape
        self.img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
        return self.pipe._pack_latents(z, b, c, h, w)

    def predict(self, xs, s, cond):
        guidance = torch.full_like(s, self.GUIDANCE) if self.model.config.guidance_embeds else None
        return self.model(
            hidden_states=xs, timestep=s, guidance=guidance, img_ids=self.img_ids, txt_ids=self.txt_ids, **cond
        ).sample


def denoiser_for(pipe) -> Denoiser:
    kind = family(pipe)
    if kind not in ("flux", "sd3", "sdxl", "sd"):
        raise ComcatError(
            f"Customize trains SD 1.x/2.x, SDXL, SD3/SD3.5 and Flux pipelines; {type(pipe).__name__} ({kind}) takes "
            "adapters through comcat.customization.adapter.add_adapter but has no training recipe here"
        )
    return {"flux": Flux, "sd3": FlowMatching, "sdxl": SDXL}.get(kind, Denoiser)(pipe)
