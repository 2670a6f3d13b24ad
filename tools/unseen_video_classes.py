"""Tiny random-weight builders of the video denoiser classes that tools/check_unseen_classes.py
runs, each with its pipeline call arguments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AllegroPipeline,
    AllegroTransformer3DModel,
    AnimateDiffPipeline,
    AutoencoderKLAllegro,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    MochiPipeline,
    MochiTransformer3DModel,
    MotionAdapter,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2Transformer3DModel,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaModel,
)
from unseen_image_classes import tiny_kl_vae

from diffkiln.zoo.architectures.audio_video import tiny_ltx2
from diffkiln.zoo.architectures.components import (
    clip_encoder,
    clip_tokenizer,
    lm_tokenizer,
    t5_encoder,
    t5_tokenizer,
)
from diffkiln.zoo.architectures.video import tiny_wan

TILED_VAE = {"allegro"}
"""Classes whose VAE decodes only in tiles (``enable_tiling()``; diffusers raises otherwise)."""


def allegro(scratch: Path) -> Any:
    tok = t5_tokenizer(scratch / "t5")
    transformer = AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24,
        sample_height=8,
        sample_width=8,
        sample_frames=3,
        caption_channels=16,
    )
    vae = AutoencoderKLAllegro(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2, sample_size=32
    )
    vae.use_tiling = False
    return AllegroPipeline(
        tokenizer=tok, text_encoder=t5_encoder(tok, 16), vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )


def mochi(scratch: Path) -> Any:
    tok = t5_tokenizer(scratch / "t5")
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        text_embed_dim=24,
        time_embed_dim=4,
        max_sequence_length=32,
    )
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=t5_encoder(tok, 24),
        tokenizer=tok,
        transformer=transformer,
    )


def animatediff(scratch: Path) -> Any:
    tok = clip_tokenizer(scratch / "clip")
    unet = UNet2DConditionModel(
        block_out_channels=(16, 24),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    adapter = MotionAdapter(
        block_out_channels=(16, 24),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=4,
        motion_max_seq_length=8,
        use_motion_mid_block=False,
    )
    return AnimateDiffPipeline(
        vae=tiny_kl_vae(),
        text_encoder=clip_encoder(tok, 24),
        tokenizer=tok,
        unet=unet,
        motion_adapter=adapter,
        scheduler=DDIMScheduler(beta_schedule="linear"),
    )


def hunyuan_video(scratch: Path) -> Any:
    tok = lm_tokenizer()
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    llama = LlamaModel(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=len(tok),
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    # The pipeline pads CLIP prompts to 77 tokens: a CLIP tokenizer and encoder of that length.
    clip_tok = clip_tokenizer(scratch / "clip")
    clip_tok.model_max_length = 77
    clip_tok.save_pretrained(scratch / "clip77")
    clip_tok = CLIPTokenizer.from_pretrained(scratch / "clip77")
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    return HunyuanVideoPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=llama,
        tokenizer=tok,
        text_encoder_2=clip,
        tokenizer_2=clip_tok,
    )


def skyreels_df(scratch: Path) -> Any:
    """SkyReels-V2 diffusion forcing: a Wan-style transformer whose timestep is one per latent frame,
    frames at different noise levels in one call (``ar_step`` > 0: asynchronous, later frames
    noisier), with UniPC on flow sigmas."""
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                               in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                               num_layers=2, rope_max_seq_len=32)  # fmt: skip
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return SkyReelsV2DiffusionForcingPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, 32, umt5=True), vae=vae,
                                              transformer=transformer, scheduler=scheduler)  # fmt: skip


def wan22(scratch: Path) -> Any:
    """Wan 2.2 text-to-video as A14B is laid out: a high-noise and a low-noise transformer of one
    config, initialised independently, switched at boundary_ratio 0.875 (its released value)."""
    base = tiny_wan(scratch)
    torch.manual_seed(2)
    expert = WanTransformer3DModel.from_config(base.transformer.config)
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       transformer=base.transformer, scheduler=base.scheduler, transformer_2=expert,
                       boundary_ratio=0.875)  # fmt: skip


def wan22_i2v(scratch: Path) -> Any:
    """Wan 2.2 image-to-video as I2V-A14B is laid out: two experts of one config taking the noise,
    the first-frame mask and the image's latents (36 channels), no image encoder, switched at
    boundary ratio 0.9."""
    tok = t5_tokenizer(scratch / "tokenizer")
    experts = [WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=36, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32) for _ in range(2)]  # fmt: skip
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    return WanImageToVideoPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, 32, umt5=True), vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), image_processor=None,
                                   image_encoder=None, transformer=experts[0], transformer_2=experts[1],
                                   boundary_ratio=0.9)  # fmt: skip


VIDEO_CLASSES: dict[str, tuple[Callable[[Path], Any], dict[str, Any]]] = {
    "allegro": (
        allegro,
        {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16, "clean_caption": False},
    ),
    "mochi": (mochi, {"height": 32, "width": 32, "num_frames": 7, "max_sequence_length": 16}),
    "animatediff": (animatediff, {"height": 32, "width": 32, "num_frames": 4}),
    "hunyuan-video": (hunyuan_video, {"height": 32, "width": 16, "num_frames": 5, "max_sequence_length": 16}),
    "skyreels-df": (
        skyreels_df,
        {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 16, "ar_step": 1, "causal_block_size": 1},
    ),
    # guidance_scale_2: the low-noise expert's own guidance, as Wan 2.2's pipeline takes it.
    "wan22": (wan22, {"height": 16, "width": 32, "num_frames": 5, "max_sequence_length": 16, "guidance_scale_2": 3.0}),
    "wan22-i2v": (wan22_i2v, {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16}),
    "ltx2": (tiny_ltx2, {"height": 32, "width": 32, "num_frames": 5, "frame_rate": 25.0, "max_sequence_length": 16}),
}
