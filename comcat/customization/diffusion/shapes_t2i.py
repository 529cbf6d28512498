"""The embedded text-to-image model: a pixel-space diffusers UNet conditioned on a small CLIP
text encoder, trained on the procedural shapes world with one shape (the heart) held out.

Captions come from four templates ("a red star", "a red star on a dark background",
"a star in red", "a star in red on a dark background"); the word-level tokenizer knows every
caption word plus a few reserved rare tokens ("v*", "sks", ...) that pretraining never sees,
so they are free to name a new concept.
"""

from __future__ import annotations

import random

from ...core.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapeSpec

HELD_OUT = "heart"
TRAIN_SHAPES = tuple(s for s in SHAPES if s != HELD_OUT)
RESERVED_TOKENS = ("v*", "s*", "sks", "<new1>", "<new2>")
SPECIAL = {"pad": "<|pad|>", "unk": "<|unk|>", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}
MAX_TOKENS = 16
# classifier-free guidance that draws the prompted shape most often (benchmarks/diffusion_quality.py, DDIM):
# 1 -> 49%, 2 -> 77%, 2.5 -> 83%, 4 -> 54%, 8 -> 18% (stronger guidance over-saturates this pixel model)
GUIDANCE = 2.5
IMAGE_SIZE = 32
TEMPLATES = (
    "a {colour} {shape}",
    "a {colour} {shape} on a {background} background",
    "a {shape} in {colour}",
    "a {shape} in {colour} on a {background} background",
)
PACK = 2  # the UNet sees 2x2 pixel blocks as channels: (3, 32, 32) <-> (12, 16, 16)
# attention_head_dim is diffusers' legacy name for the number of heads of this UNet
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // PACK,
    in_channels=3 * PACK**2,
    out_channels=3 * PACK**2,
    layers_per_block=1,
    block_out_channels=(64, 96, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    projection_dim=64,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def vocabulary() -> list[str]:
    """Specials first, then every word a caption can use, then the reserved rare tokens."""
    words = {w for t in TEMPLATES for w in t.split() if not w.startswith("{")}
    words |= set(TRAIN_SHAPES) | set(COLOURS) | set(BACKGROUNDS) | {"photo", "of", "the", "an"}
    return list(SPECIAL.values()) + sorted(words) + list(RESERVED_TOKENS)


def caption(spec: ShapeSpec, rng: random.Random) -> str:
    """One of the templates, filled with `spec`."""
    return rng.choice(TEMPLATES).format(shape=spec.shape, colour=spec.colour, background=spec.background)


def build_tokenizer():
    """A lower-casing, whitespace-split word-level `PreTrainedTokenizerFast` (bos ... eos, padded)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = SPECIAL["bos"], SPECIAL["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=MAX_TOKENS,
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        bos_token=bos,
        eos_token=eos,
    )


def build_text_encoder(tokenizer):
    """A small randomly initialised `CLIPTextModel` matching `tokenizer`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_scheduler():
    """UniPC sampling (benchmarks/diffusion_quality.py, 25 steps, guidance 2.5: base shape accuracy
    DDIM 79-83%, DPM-Solver++ 84-88%, UniPC 83-87%; DDIM got worse with more steps)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**SCHEDULER_CONFIG, timestep_spacing="leading")
