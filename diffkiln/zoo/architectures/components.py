"""Shared tiny components of the random-weight architecture pipelines: text encoders, tokenizers, VAE.

The tokenizers are made by diffkiln (byte-level BPE for CLIP, unigram for T5/UMT5, word-level for
the decoder language models) from a small word list, so no tokenizer file is ever downloaded. Any
text still tokenizes: words outside the list fall back to bytes (CLIP) or letters (T5, the
others).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5EncoderModel,
    T5Tokenizer,
    UMT5EncoderModel,
)

from diffkiln.zoo.catalog import TINY_IMAGE_SIZE, TINY_T5_LENGTH
from diffkiln.zoo.shapes_models import build_t5_encoder, build_text_encoder
from diffkiln.zoo.tokenizer import build_clip_tokenizer, build_t5_tokenizer, build_word_tokenizer

__all__ = [
    "CLIP_MAX_LENGTH",
    "WORDS",
    "clip_encoder",
    "clip_tokenizer",
    "lm_tokenizer",
    "t5_encoder",
    "t5_tokenizer",
    "tiny_vae",
]


CLIP_MAX_LENGTH = 16
"""Padded CLIP prompt length of the tiny pipelines (77 in real CLIP)."""

_WORD_TEXT = """a an the of on in at with and to by under over next from
photo painting drawing portrait close up view aerial black white red blue green yellow orange
purple pink brown golden old young small big little tall dog cat bird horse car bicycle train
boat house city street forest mountain lake river sea beach sky sun moon snow rain night
morning sunset tree flower field man woman child people table cup bowl book window wall
kitchen park bridge road garden shop sign statue museum island desert shoes fruit coffee
running sleeping playing floating sitting standing"""

WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())
"""Words that become single tokens; the generic calibration prompts are mostly made of them."""


def clip_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Write and load the tiny pipelines' CLIP tokenizer (BOS, EOS, byte-level BPE).

    Args:
        out_dir: folder to write vocab.json, merges.txt and the config into.
    """
    return build_clip_tokenizer(WORDS, out_dir, CLIP_MAX_LENGTH)


def t5_tokenizer(out_dir: str | Path) -> T5Tokenizer:
    """Write and load the tiny pipelines' T5 tokenizer (also read by UMT5 encoders).

    Args:
        out_dir: folder to write the tokenizer into.
    """
    return build_t5_tokenizer(WORDS, out_dir, TINY_T5_LENGTH)


def lm_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """The tiny pipelines' stand-in for a decoder language model's tokenizer (Gemma, Llama, GLM,
    Qwen): word-level, BOS first, ``<pad>`` id 0.

    Args:
        max_length: ``model_max_length``. Default 512.
    """
    return build_word_tokenizer(WORDS, max_length)


def clip_encoder(
    tokenizer: CLIPTokenizer, width: int, projection_dim: int | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A two-layer causal CLIP text encoder (so its BOS output is prompt-invariant, as in real CLIP).

    Args:
        tokenizer: the tokenizer it reads (special-token ids and vocabulary size).
        width: hidden size.
        projection_dim: when set, a ``CLIPTextModelWithProjection`` with this projection width
            (SDXL's second and SD3's encoders); else a plain ``CLIPTextModel``. Default None.
    """
    return build_text_encoder(tokenizer, width, projection_dim, layers=2, heads=2)


def t5_encoder(tokenizer: T5Tokenizer, width: int, umt5: bool = False) -> T5EncoderModel | UMT5EncoderModel:
    """A two-layer T5 (or UMT5, Wan's encoder) text encoder.

    Args:
        tokenizer: the tokenizer it reads.
        width: ``d_model``.
        umt5: build a ``UMT5EncoderModel`` instead of a ``T5EncoderModel``. Default False.
    """
    return build_t5_encoder(tokenizer, width, umt5=umt5)


def tiny_vae(quant_convs: bool = True) -> AutoencoderKL:
    """A two-level AutoencoderKL: 32x32 pixels <-> 16x16x4 latents (scale 1, shift 0).

    Args:
        quant_convs: keep the 1x1 convs around the latent (SD1.5/SDXL/SD3 have them, FLUX does
            not). Default True.
    """
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
