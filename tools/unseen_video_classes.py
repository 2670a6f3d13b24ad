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
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeliosPipeline,
    HeliosScheduler,
    HeliosTransformer3DModel,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    Kandinsky5T2VPipeline,
    Kandinsky5Transformer3DModel,
    MochiPipeline,
    MochiTransformer3DModel,
    MotionAdapter,
    SanaVideoPipeline,
    SanaVideoTransformer3DModel,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2Transformer3DModel,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from transformers import (
    ByT5Tokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    LlamaConfig,
    LlamaModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    T5Config,
    T5EncoderModel,
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
ONE_CLIP_PER_DECODE = {"hunyuan-video-1.5"}
"""Classes whose VAE decodes one clip per call (HunyuanVideo 1.5's fails on two in diffusers 0.42,
in plain diffusers too): their report runs with ``--batch-size 1``."""


def clip77(scratch: Path, width: int) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """A CLIP tokenizer and text encoder of 77 positions, ``width`` wide: HunyuanVideo's and
    Kandinsky 5's pipelines pad CLIP prompts to 77 tokens."""
    tok = clip_tokenizer(scratch / "clip")
    tok.model_max_length = 77
    tok.save_pretrained(scratch / "clip77")
    tok = CLIPTokenizer.from_pretrained(scratch / "clip77")
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return tok, CLIPTextModel(config)


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
    clip_tok, clip = clip77(scratch, 8)
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


def hunyuan_video15(scratch: Path) -> Any:
    """HunyuanVideo 1.5: a Qwen2.5-VL text model read past its 108-token template (the word-level
    stand-in renders the system prompt as 108 words) and a ByT5 for quoted glyph text, a guider
    component running classifier-free guidance (diffusers' guiders), image-conditioning channels
    in the latent input (zero for text-to-video) and its own VAE."""
    tok = lm_tokenizer(2048)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ 'the ' * 108 }}{% else %}{{ m['content'] }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %} to{% endif %}"
    )
    transformer = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2,
                                                   attention_head_dim=8, num_layers=2, num_refiner_layers=1,
                                                   mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                                                   text_embed_2_dim=32, image_embed_dim=12, rope_axes_dim=(2, 2, 4),
                                                   target_size=16, task_type="t2v")  # fmt: skip
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False)  # fmt: skip
    rope = {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok),
                                                    rope_scaling=rope, rope_theta=1e6))  # fmt: skip
    byt5 = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return HunyuanVideo15Pipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=qwen,
                                  text_encoder_2=byt5, tokenizer=tok, tokenizer_2=ByT5Tokenizer(),
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0))  # fmt: skip


def _unzeroed(model: torch.nn.Module) -> None:
    """Random values (std 0.02) in every weight the constructor leaves at zero, as training leaves
    none: Kandinsky 5 zero-initialises its modulations (adaLN-zero), whose gates then silence every
    block, and a quantized block would change nothing measurable."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and not param.any():
                param.normal_(0.0, 0.02)


def kandinsky5(scratch: Path) -> Any:
    """Kandinsky 5 text-to-video: a Qwen2.5-VL read past its 128-token template (the word-level
    stand-in splits the template into exactly 128 tokens with its BOS), its text padded per batch
    to the longest prompt (``cu_seqlens``: each prompt's own length), a pooled CLIP vector,
    HunyuanVideo's VAE; its zero-initialised modulations given random values."""
    tok = lm_tokenizer()
    clip_tok, clip = clip77(scratch, 32)
    rope = {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_scaling": rope, "rope_theta": 1e6, "vocab_size": len(tok)}  # fmt: skip
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=16,
                                                               vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                               eos_token_id=tok.eos_token_id))  # fmt: skip
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, spatial_compression_ratio=8,
                                    temporal_compression_ratio=4, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, norm_num_groups=4)  # fmt: skip
    transformer = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=16, in_text_dim2=32, time_dim=32,
                                               out_visual_dim=4, patch_size=(1, 2, 2), model_dim=48, ff_dim=128,
                                               num_text_blocks=1, num_visual_blocks=2, axes_dims=(8, 8, 8),
                                               visual_cond=False)  # fmt: skip
    _unzeroed(transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return Kandinsky5T2VPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=qwen,
                                 tokenizer=tok, text_encoder_2=clip, tokenizer_2=clip_tok)  # fmt: skip


def sana_video(scratch: Path) -> Any:
    """SANA-Video: SANA's linear-attention DiT over video (3-D rotary positions), Wan's VAE, a Gemma 2
    encoder read with SANA's instruction prefix, DPM-Solver++."""
    tok = lm_tokenizer()
    transformer = SanaVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=2,
                                              attention_head_dim=12, num_layers=2, num_cross_attention_heads=2,
                                              cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
                                              mlp_ratio=2.5, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
                                              norm_elementwise_affine=False, qk_norm="rms_norm_across_heads",
                                              rope_max_seq_len=32)  # fmt: skip
    gemma = Gemma2Model(Gemma2Config(head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                     num_hidden_layers=2, num_key_value_heads=2, vocab_size=len(tok), pad_token_id=0,
                                     attn_implementation="eager"))  # fmt: skip
    return SanaVideoPipeline(tokenizer=tok, text_encoder=gemma, vae=_wan_vae(), transformer=transformer,
                             scheduler=DPMSolverMultistepScheduler())  # fmt: skip


def helios(scratch: Path) -> Any:
    """Helios: a Wan-style transformer that generates a long clip chunk by chunk, each chunk's calls
    conditioned on the latents of the chunks before it (multi-term memory patches), with its own
    scheduler."""
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                           in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                           num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                           rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
                                           guidance_cross_attn=True, zero_history_timestep=True,
                                           is_amplify_history=False)  # fmt: skip
    scheduler = HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True)
    return HeliosPipeline(tokenizer=tok, text_encoder=t5_encoder(tok, 32), vae=_wan_vae(), transformer=transformer,
                          scheduler=scheduler)  # fmt: skip


def _wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])  # fmt: skip


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
    "hunyuan-video-1.5": (hunyuan_video15, {"height": 16, "width": 16, "num_frames": 9}),
    "kandinsky5": (kandinsky5, {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16}),
    "sana-video": (
        sana_video,
        {"height": 32, "width": 32, "frames": 9, "max_sequence_length": 16, "use_resolution_binning": False},
    ),
    "helios": (helios, {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 16}),
    "ltx2": (tiny_ltx2, {"height": 32, "width": 32, "num_frames": 5, "frame_rate": 25.0, "max_sequence_length": 16}),
}
