"""Transformer (DiT) architectures: SD3 (MMDiT), FLUX and PixArt, tiny (random) and full size."""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from diffkiln.zoo.architectures.components import clip_encoder, clip_tokenizer, t5_encoder, t5_tokenizer, tiny_vae

__all__ = ["full_pixart_transformer", "full_sd3_transformer", "tiny_flux", "tiny_pixart", "tiny_sd3"]


def tiny_sd3(scratch: Path) -> StableDiffusion3Pipeline:
    """SD3 layout at toy width: two CLIPs with projection plus T5, an MMDiT, flow-matching Euler.

    Args:
        scratch: a folder for the tokenizer files.
    """
    tok = clip_tokenizer(scratch / "tokenizer")
    t5tok = t5_tokenizer(scratch / "tokenizer_t5")
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,  # the T5 width; the two CLIPs' 16 + 16 are padded to it
        caption_projection_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=clip_encoder(tok, 16, projection_dim=16),
        tokenizer=tok,
        text_encoder_2=clip_encoder(tok, 16, projection_dim=16),
        tokenizer_2=tok,
        text_encoder_3=t5_encoder(t5tok, 32),
        tokenizer_3=t5tok,
    )


def tiny_flux(scratch: Path) -> FluxPipeline:
    """FLUX layout at toy width: CLIP (pooled) plus T5, double- and single-stream blocks, RoPE.

    Args:
        scratch: a folder for the tokenizer files.
    """
    tok = clip_tokenizer(scratch / "tokenizer")
    t5tok = t5_tokenizer(scratch / "tokenizer_t5")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_vae(quant_convs=False)
    return FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip_encoder(tok, 32),
        tokenizer=tok,
        text_encoder_2=t5_encoder(t5tok, 32),
        tokenizer_2=t5tok,
    )


def tiny_pixart(scratch: Path) -> PixArtAlphaPipeline:
    """PixArt-alpha layout at toy width: T5, adaLN-single DiT with cross-attention, DPM-Solver.

    Call it with ``use_resolution_binning=False``: PixArt's aspect-ratio bins assume 256+ pixels.

    Args:
        scratch: a folder for the tokenizer files.
    """
    t5tok = t5_tokenizer(scratch / "tokenizer")
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        out_channels=8,  # PixArt predicts noise and variance
        cross_attention_dim=16,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtAlphaPipeline(
        tokenizer=t5tok,
        text_encoder=t5_encoder(t5tok, 32),
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
        ),
    )


def full_pixart_transformer() -> PixArtTransformer2DModel:
    """The PixArt-alpha XL/2 512px transformer config (about 610M parameters), random weights."""
    return PixArtTransformer2DModel(
        sample_size=64,
        num_layers=28,
        patch_size=2,
        attention_head_dim=72,
        num_attention_heads=16,
        caption_channels=4096,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=1152,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def full_sd3_transformer() -> SD3Transformer2DModel:
    """The SD3-medium MMDiT config (about 2B parameters), random weights."""
    return SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )
