"""Tiny random-weight builders of the image (and audio) denoiser classes that
tools/check_unseen_classes.py runs, each with its pipeline call arguments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderOobleck,
    ChromaPipeline,
    ChromaTransformer2DModel,
    CogView4Pipeline,
    CogView4Transformer2DModel,
    DDIMScheduler,
    EDMDPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    StableAudioDiTModel,
    StableAudioPipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.stable_audio import StableAudioProjectionModel
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    Gemma2Config,
    Gemma2Model,
    GlmConfig,
    GlmModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from diffkiln.zoo.architectures.components import (
    WORDS,
    clip_encoder,
    clip_tokenizer,
    lm_tokenizer,
    t5_encoder,
    t5_tokenizer,
)


def tiny_kl_vae(latent: int = 4, levels: int = 2, **extra: Any) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8,) * (levels - 1) + (16,),
        latent_channels=latent,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        sample_size=32,
        **extra,
    )


def hunyuan(scratch: Path) -> Any:
    scratch.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS))]
    (scratch / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizer(str(scratch / "vocab.txt"), model_max_length=77)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=3,
            intermediate_size=48,
            max_position_embeddings=80,
        )
    )
    t5tok = t5_tokenizer(scratch / "t5")
    transformer = HunyuanDiT2DModel(
        sample_size=8,
        num_layers=4,  # skip connections pair the first half with the second
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        cross_attention_dim=24,
        cross_attention_dim_t5=24,
        pooled_projection_dim=12,
        hidden_size=24,
        text_len=77,  # the pipeline tokenizes BERT to 77
        text_len_t5=256,
    )
    return HunyuanDiTPipeline(
        vae=tiny_kl_vae(levels=4),
        text_encoder=bert,
        tokenizer=tok,
        transformer=transformer,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=t5_encoder(t5tok, 24),
        tokenizer_2=t5tok,
    )


def stable_audio(scratch: Path) -> Any:
    tok = t5_tokenizer(scratch / "t5")
    transformer = StableAudioDiTModel(
        sample_size=16,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        num_key_value_attention_heads=2,
        out_channels=4,
        cross_attention_dim=12,
        time_proj_dim=12,
        global_states_input_dim=24,
        cross_attention_input_dim=12,
    )
    vae = AutoencoderOobleck(
        encoder_hidden_size=8,
        downsampling_ratios=[2, 2],
        decoder_channels=4,
        decoder_input_channels=4,
        audio_channels=2,
        channel_multiples=[1, 2],
        sampling_rate=32,
    )
    projection = StableAudioProjectionModel(text_encoder_dim=24, conditioning_dim=12, min_value=0, max_value=64)
    return StableAudioPipeline(
        vae=vae,
        text_encoder=t5_encoder(tok, 24),
        projection_model=projection,
        tokenizer=tok,
        transformer=transformer,
        scheduler=EDMDPMSolverMultistepScheduler(prediction_type="v_prediction", sigma_data=1.0),
    )


def pixart_sigma(scratch: Path) -> Any:
    tok = t5_tokenizer(scratch / "t5")
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=3,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=24,
        caption_channels=24,
        norm_type="ada_norm_single",
        norm_num_groups=4,
        use_additional_conditions=False,
        interpolation_scale=1,
    )
    return PixArtSigmaPipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(tok, 24),
        vae=tiny_kl_vae(),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def cogview4(scratch: Path) -> Any:
    tok = lm_tokenizer()
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    glm = GlmModel(
        GlmConfig(
            hidden_size=32,
            intermediate_size=8,
            num_hidden_layers=2,
            num_attention_heads=4,
            head_dim=8,
            vocab_size=len(tok),
            pad_token_id=0,
        )
    )
    return CogView4Pipeline(tokenizer=tok, text_encoder=glm, vae=tiny_kl_vae(levels=2), transformer=transformer,
                            scheduler=scheduler)  # fmt: skip


def lumina2(scratch: Path) -> Any:
    tok = lm_tokenizer()
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=3,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=[4, 2, 2],
        cap_feat_dim=8,
    )
    gemma = Gemma2Model(
        Gemma2Config(
            head_dim=4,
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            num_key_value_heads=2,
            vocab_size=len(tok),
            pad_token_id=0,
            attn_implementation="eager",
        )
    )
    # Lumina2's pipeline shifts the latents by the VAE's shift_factor before decoding (as FLUX's).
    vae = tiny_kl_vae(levels=2, shift_factor=0.0609, scaling_factor=1.5035)
    return Lumina2Pipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                           text_encoder=gemma, tokenizer=tok)  # fmt: skip


def qwenimage(scratch: Path) -> Any:
    tok = lm_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    n = len(tok)  # the vision tokens' ids follow the words'
    text = {
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "vocab_size": n + 4,
        "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, hidden_size=16, vocab_size=n + 4,
                              vision_start_token_id=n, vision_end_token_id=n + 1, vision_token_id=n + 2)  # fmt: skip
    return QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=Qwen2_5_VLForConditionalGeneration(config), tokenizer=tok)  # fmt: skip


def zimage(scratch: Path) -> Any:
    """Z-Image: latents and text passed to the transformer as lists, one tensor per sample, each
    prompt's text of its own length; the Qwen3 encoder reads the prompt through a chat template."""
    tok = lm_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=48,
                                           n_layers=3, n_refiner_layers=1, n_heads=3, n_kv_heads=3, cap_feat_dim=24,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])  # fmt: skip
    with torch.no_grad():  # left uninitialized (torch.empty) by the constructor
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    config = Qwen3Config(hidden_size=24, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=12, vocab_size=len(tok), pad_token_id=0)  # fmt: skip
    vae = tiny_kl_vae(latent=16, levels=2, shift_factor=0.1159, scaling_factor=0.3611)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=Qwen3Model(config),
                          tokenizer=tok, transformer=transformer)  # fmt: skip


def sana(scratch: Path) -> Any:
    """SANA: ReLU linear self-attention, a Mix-FFN with a depthwise convolution, a deep-compression
    autoencoder, a Gemma 2 encoder read with a long instruction prefix."""
    tok = lm_tokenizer()
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                         num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                                         cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
                                         sample_size=32)  # fmt: skip
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)  # fmt: skip
    gemma = Gemma2Model(Gemma2Config(head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                     num_hidden_layers=2, num_key_value_heads=2, vocab_size=len(tok), pad_token_id=0,
                                     attn_implementation="eager"))  # fmt: skip
    return SanaPipeline(tokenizer=tok, text_encoder=gemma, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip


def hidream(scratch: Path) -> Any:
    """HiDream-I1: two CLIPs (pooled), T5, and a Llama read at two hidden layers stacked in front
    of the batch; a double- and single-stream DiT whose feed-forwards route tokens to experts."""
    tok, tok_2, tok_3, tok_4 = (clip_tokenizer(scratch / "clip"), clip_tokenizer(scratch / "clip2"),
                                t5_tokenizer(scratch / "t5"), lm_tokenizer(128))  # fmt: skip
    # One Llama layer per block (double and single stream), as HiDream-I1's 48 for its 16 + 32.
    transformer = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                                 num_single_layers=2, attention_head_dim=8, num_attention_heads=3,
                                                 caption_channels=[32, 24], text_emb_dim=48, num_routed_experts=4,
                                                 num_activated_experts=2, axes_dims_rope=(4, 2, 2),
                                                 max_resolution=(32, 32), llama_layers=(0, 2, 1))  # fmt: skip
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tok_4),
                                         pad_token_id=0))  # fmt: skip
    vae = tiny_kl_vae(latent=4, levels=2, shift_factor=0.1159, scaling_factor=0.3611)
    return HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
                                text_encoder=clip_encoder(tok, 32, 24), tokenizer=tok,
                                text_encoder_2=clip_encoder(tok_2, 32, 24), tokenizer_2=tok_2,
                                text_encoder_3=t5_encoder(tok_3, 32), tokenizer_3=tok_3, text_encoder_4=llama,
                                tokenizer_4=tok_4)  # fmt: skip


def chroma(scratch: Path) -> Any:
    """Chroma: FLUX's blocks with their modulations made by one MLP from the timestep alone (the
    distilled guidance layer), T5 only, the negative prompt run as a call of its own."""
    tok = t5_tokenizer(scratch / "t5")
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                           attention_head_dim=8, num_attention_heads=3, joint_attention_dim=32,
                                           axes_dims_rope=(4, 2, 2), approximator_num_channels=8,
                                           approximator_hidden_dim=32, approximator_layers=2)  # fmt: skip
    vae = tiny_kl_vae(latent=4, levels=2, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
               use_post_quant_conv=False)  # fmt: skip
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5_encoder(tok, 32),
                          tokenizer=tok, transformer=transformer)  # fmt: skip


def flux2_klein(scratch: Path) -> Any:
    """FLUX.2 [klein]: FLUX.2's transformer (shared modulation for all double- and single-stream
    blocks, four rotary axes, no guidance embedding when not distilled), its patchifying VAE, and a
    Qwen3 read at three hidden layers stacked into the text width."""
    tok = lm_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * 24,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=False)  # fmt: skip
    vae = AutoencoderKLFlux2(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=8, sample_size=32, patch_size=(2, 2))  # fmt: skip
    config = Qwen3Config(hidden_size=24, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=12, vocab_size=len(tok))  # fmt: skip
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, tokenizer=tok,
                              text_encoder=Qwen3ForCausalLM(config), transformer=transformer,
                              is_distilled=False)  # fmt: skip


IMAGE_CLASSES: dict[str, tuple[Callable[[Path], Any], dict[str, Any]]] = {
    "hunyuan-dit": (hunyuan, {"height": 64, "width": 48, "use_resolution_binning": False}),
    "stable-audio": (stable_audio, {"audio_start_in_s": 0.25, "audio_end_in_s": 1.75}),
    "pixart-sigma": (
        pixart_sigma,
        {"height": 48, "width": 32, "max_sequence_length": 32, "clean_caption": False, "use_resolution_binning": False},
    ),
    "cogview4": (cogview4, {"height": 32, "width": 48, "max_sequence_length": 16}),
    "lumina2": (lumina2, {"height": 32, "width": 32, "max_sequence_length": 32}),
    "qwenimage": (qwenimage, {"height": 48, "width": 32, "max_sequence_length": 16}),
    "zimage": (zimage, {"height": 32, "width": 48, "max_sequence_length": 24}),
    # Without binning: the pipeline maps any size to its 1024 px aspect-ratio bins.
    "sana": (sana, {"height": 64, "width": 32, "max_sequence_length": 16, "use_resolution_binning": False}),
    # HiDream's pipeline rescales every size to its default area (256 px square with this VAE); a
    # non-square one is padded to max_resolution's patch count, which this toy keeps small.
    "hidream": (hidream, {"height": 32, "width": 32, "max_sequence_length": 16}),
    "chroma": (chroma, {"height": 32, "width": 48, "max_sequence_length": 16}),
    # The Qwen3 layers FLUX.2 [klein] stacks (9, 18, 27 in the released model, which has 36).
    "flux2-klein": (
        flux2_klein,
        {"height": 32, "width": 48, "max_sequence_length": 16, "text_encoder_out_layers": [1, 2, 3]},
    ),
}
