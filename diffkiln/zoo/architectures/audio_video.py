"""Audio-video architecture: LTX-2 (one transformer denoising a video and an audio latent together)."""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    FlowMatchEulerDiscreteScheduler,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
)
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

from diffkiln.zoo.architectures.components import lm_tokenizer

__all__ = ["tiny_ltx2"]


def tiny_ltx2(scratch: Path) -> LTX2Pipeline:
    """LTX-2: one transformer denoising a video latent and an audio latent together (each stream
    with its own attention, cross-attending the other both ways), text from a Gemma 3 read at every
    hidden layer through two connectors (one per stream), a video VAE, an audio VAE and a vocoder.
    Call it with small ``height``/``width``/``num_frames`` (32, 32, 5) and ``max_sequence_length``.

    Args:
        scratch: unused (the word-level tokenizer needs no files); kept for the builders' signature.
    """
    tok = lm_tokenizer()
    text = Gemma3TextConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, vocab_size=len(tok), pad_token_id=0)  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}  # fmt: skip
    gemma = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text.to_dict(), vision_config=vision,
                                                        mm_tokens_per_image=4))  # fmt: skip
    width, depth = text.hidden_size, text.num_hidden_layers
    transformer = LTX2VideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                                              num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                              audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
                                              audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2,
                                              qk_norm="rms_norm_across_heads", caption_channels=width,
                                              rope_double_precision=False, rope_type="split")  # fmt: skip
    connectors = LTX2TextConnectors(caption_channels=width, text_proj_in_factor=depth + 1,
                                    video_connector_num_attention_heads=4, video_connector_attention_head_dim=8,
                                    video_connector_num_layers=1, video_connector_num_learnable_registers=None,
                                    audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=8,
                                    audio_connector_num_layers=1, audio_connector_num_learnable_registers=None,
                                    connector_rope_base_seq_len=32, rope_theta=10000.0, rope_double_precision=False,
                                    causal_temporal_positioning=False, rope_type="split")  # fmt: skip
    vae = AutoencoderKLLTX2Video(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                 decoder_block_out_channels=(8,), layers_per_block=(1,),
                                 decoder_layers_per_block=(1, 1),
                                 spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,),
                                 decoder_inject_noise=(False, False), downsample_type=("spatial",),
                                 upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False,
                                 patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)  # fmt: skip
    audio_vae = AutoencoderKLLTX2Audio(base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                                       attn_resolutions=None, in_channels=2, resolution=32, latent_channels=2,
                                       norm_type="pixel", causality_axis="height", dropout=0.0,
                                       mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160,
                                       is_causal=True, mel_bins=8)  # fmt: skip
    vocoder = LTX2Vocoder(in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4],
                          upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                          leaky_relu_negative_slope=0.1, output_sampling_rate=16000)  # fmt: skip
    return LTX2Pipeline(transformer=transformer, vae=vae, audio_vae=audio_vae, text_encoder=gemma, tokenizer=tok,
                        scheduler=FlowMatchEulerDiscreteScheduler(), connectors=connectors,
                        vocoder=vocoder)  # fmt: skip
