"""The architecture of shapes-video: diffusers' ``WanPipeline`` at toy width for the moving-shapes
world (:mod:`diffkiln.zoo.shapes.video`). Stock classes only, so a saved folder loads with
``DiffusionPipeline.from_pretrained`` and no custom code.

* ``AutoencoderKLWan`` with two spatial and no temporal downsamplings: a 17x64x64 clip becomes
  17x16x16 latents with ``VIDEO_LATENT_CHANNELS`` channels (every frame kept: temporal compression
  would leave 5 latent frames, too few for a frame-level sparse mask to mean anything);
* ``WanTransformer3DModel`` with patch (1, 2, 2): 17 x 8 x 8 = 1,088 video tokens per sample;
* a two-layer ``UMT5EncoderModel`` reading our own T5 tokenizer of the world's words;
* flow-matching Euler, as Wan is trained.

With no temporal compression, ``WanPipeline`` adds one frame to the ``num_frames`` it is given (it
rounds to ``k * scale_factor_temporal + 1``): call it with ``num_frames=VIDEO_FRAMES - 1`` for the
world's 17-frame clips.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5Tokenizer, UMT5EncoderModel

from diffkiln.zoo.shapes.video import VIDEO_FRAMES, video_prompt_words
from diffkiln.zoo.shapes.vocab import IMAGE_SIZE
from diffkiln.zoo.shapes_models import build_t5_encoder
from diffkiln.zoo.tokenizer import build_t5_tokenizer

__all__ = [
    "VIDEO_LATENT_CHANNELS",
    "VIDEO_TEXT_LENGTH",
    "assemble_shapes_video",
    "build_video_tokenizer",
    "build_video_transformer",
    "build_video_vae",
    "video_tokens_per_sample",
]

VIDEO_LATENT_CHANNELS = 8
"""Channels of the video latent."""
VIDEO_TEXT_LENGTH = 24
"""Tokens of a caption (the longest pair caption fits)."""
_SPATIAL_DOWN = 4
_PATCH = (1, 2, 2)


def build_video_tokenizer(out_dir: str | Path) -> T5Tokenizer:
    """Write and load the moving-shapes T5 tokenizer (UMT5 reads it)."""
    return build_t5_tokenizer(video_prompt_words(), out_dir, VIDEO_TEXT_LENGTH)


def build_video_vae() -> AutoencoderKLWan:
    """``AutoencoderKLWan``: 3x64x64 frames <-> 8x16x16 latents, frame by frame in time."""
    return AutoencoderKLWan(
        base_dim=16,
        z_dim=VIDEO_LATENT_CHANNELS,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, False],
        latents_mean=[0.0] * VIDEO_LATENT_CHANNELS,
        latents_std=[1.0] * VIDEO_LATENT_CHANNELS,
        scale_factor_temporal=1,  # WanPipeline sizes the latents from these, not from the layout
        scale_factor_spatial=_SPATIAL_DOWN,
    )


def build_video_transformer(
    text_dim: int = 64, heads: int = 3, layers: int = 4, ffn: int = 192
) -> WanTransformer3DModel:
    """The denoiser: Wan blocks of width ``heads`` x 32.

    Args:
        text_dim: the text encoder's width. Default 64.
        heads: attention heads of 32 channels. Default 3.
        layers: Wan blocks. Default 4.
        ffn: the MLP's width. Default 192.
    """
    return WanTransformer3DModel(
        patch_size=_PATCH,
        num_attention_heads=heads,
        attention_head_dim=32,
        in_channels=VIDEO_LATENT_CHANNELS,
        out_channels=VIDEO_LATENT_CHANNELS,
        text_dim=text_dim,
        freq_dim=64,
        ffn_dim=ffn,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def video_tokens_per_sample(frames: int = VIDEO_FRAMES, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(video tokens the denoiser's attention sees per sample, latent frames)."""
    side = size // _SPATIAL_DOWN // _PATCH[1]
    return frames * side * side, frames


def assemble_shapes_video(
    scratch: str | Path,
    vae: AutoencoderKLWan | None = None,
    transformer: WanTransformer3DModel | None = None,
    text_encoder: UMT5EncoderModel | None = None,
) -> WanPipeline:
    """The pipeline, from trained parts or fresh ones.

    Args:
        scratch: a folder for the tokenizer files.
        vae: the trained VAE, or None for a fresh one.
        transformer: the trained denoiser, or None for a fresh one.
        text_encoder: the trained encoder, or None for a fresh one.
    """
    tokenizer = build_video_tokenizer(Path(scratch) / "tokenizer")
    encoder = text_encoder or build_t5_encoder(tokenizer, 64, umt5=True)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=vae or build_video_vae(),
        transformer=transformer or build_video_transformer(encoder.config.d_model),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
