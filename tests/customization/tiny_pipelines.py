"""Tiny random-init SDXL, SD3 and Flux pipelines built offline (the embedded model's word-level
tokenizer stands in for each CLIP and T5 tokenizer): what the Customize tests train on."""

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from comcat.customization.diffusion.shapes_t2i import build_tokenizer


def sdxl_unet(**over):
    """An SDXL-style UNet: added time / text embeddings, two transformer layers in a block, linear projections."""
    cfg = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 16,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    return UNet2DConditionModel(**cfg | over)


def sd3_transformer(**over):
    """SD3-medium-style: joint attention without q/k norms, the last block context-pre-only."""
    cfg = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
    )
    return SD3Transformer2DModel(**cfg | over)


def flux_transformer(**over):
    """Flux: a double-stream and a single-stream block, rotary q/k over (text, image) positions."""
    cfg = dict(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    return FluxTransformer2DModel(**cfg | over)


def _clip(tok, width: int, projection: bool):
    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        projection_dim=width,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5(width: int):
    vocab = len(build_tokenizer())
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=width, d_kv=8, d_ff=width, num_layers=1, num_heads=2))
    return t5.eval()  # as from_pretrained leaves it: no dropout


def _vae(latent_channels: int, **kw):
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        **kw,
    )


def sdxl():
    torch.manual_seed(0)
    tok = build_tokenizer()
    unet = sdxl_unet()
    return StableDiffusionXLPipeline(
        vae=_vae(4),
        text_encoder=_clip(tok, 16, False),
        text_encoder_2=_clip(tok, 16, True),
        tokenizer=tok,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )


def sd3(**over):
    """SD3-medium-style; sd3(qk_norm="rms_norm", dual_attention_layers=(0,)) is SD3.5-style."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    widths = dict(in_channels=16, out_channels=16, joint_attention_dim=32, pooled_projection_dim=32)
    transformer = sd3_transformer(**widths | over)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(16, shift_factor=0.1, scaling_factor=1.5),
        text_encoder=_clip(tok, 16, True),
        tokenizer=tok,
        text_encoder_2=_clip(tok, 16, True),
        tokenizer_2=build_tokenizer(),
        text_encoder_3=_t5(32),
        tokenizer_3=build_tokenizer(),
    )


def flux():
    torch.manual_seed(0)
    tok, t5_tok = build_tokenizer(), build_tokenizer()
    widths = dict(in_channels=64, joint_attention_dim=32, pooled_projection_dim=16)
    transformer = flux_transformer(**widths, guidance_embeds=True)
    t5 = _t5(32)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(16, shift_factor=0.1, scaling_factor=1.5),
        text_encoder=_clip(tok, 16, False),
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.default_sample_size = 8  # 16 px images: 8x8 latents, 4x4 packed tokens
    return pipe
