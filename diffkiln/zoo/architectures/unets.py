"""UNet architectures: SD1.5-class and SDXL-class, tiny (random, for tests) and full size (benchmarks)."""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from diffkiln.zoo.architectures.components import clip_encoder, clip_tokenizer, tiny_vae

__all__ = ["full_sd15_unet", "full_sdxl_unet", "tiny_sd15", "tiny_sdxl"]

_SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def tiny_sd15(scratch: Path) -> StableDiffusionPipeline:
    """SD1.5 layout at toy width: one CLIP, a cross-attention UNet, AutoencoderKL, DDIM.

    Args:
        scratch: a folder for the tokenizer files.
    """
    tok = clip_tokenizer(scratch / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=clip_encoder(tok, 32),
        tokenizer=tok,
        unet=unet,
        scheduler=DDIMScheduler(**_SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl(scratch: Path) -> StableDiffusionXLPipeline:
    """SDXL layout at toy width: two CLIPs (the second with projection), micro-conditioning, Euler.

    Args:
        scratch: a folder for the tokenizer files.
    """
    tok = clip_tokenizer(scratch / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),
        cross_attention_dim=64,  # the two encoders' hidden states, concatenated
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + six size/crop numbers
        norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=clip_encoder(tok, 32),
        text_encoder_2=clip_encoder(tok, 32, projection_dim=32),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**_SD_SCHEDULE),
    )


def full_sd15_unet() -> UNet2DConditionModel:
    """The Stable Diffusion 1.5 UNet config (about 860M parameters), random weights."""
    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def full_sdxl_unet() -> UNet2DConditionModel:
    """The SDXL base UNet config (about 2.6B parameters), random weights."""
    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
