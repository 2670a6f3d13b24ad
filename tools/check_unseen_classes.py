"""Sixteen denoiser classes built outside the test matrix, and Wan 2.2's two-expert sampler, each
with shapes and call arguments of its own, run through `diffkiln optimize FOLDER` with
`--call-arg` options only, as a user would.

For each: build the tiny pipeline (random weights, seed 1) and save it as a diffusers folder; run
the CLI in a fresh process; then load the bundle and the folder and compare the bundle's denoiser
with the FP one on every sampler call of a held-out prompt (per-call SQNR; issue 20's bar: 20 dB),
and each quantized expert beside it on its own calls.
Then `diffkiln report BUNDLE` in a fresh process, which decodes: the final latents' SQNR against
FP. Allegro's VAE decodes only in tiles: its report runs with `--vae-tiling`, and once without, to
record the one-line error that names the option. Last, `diffkiln export BUNDLE --format onnx
--denoiser-only`: the graph's dynamic axes and its check against the torch runtime, or the error.
Fourteen of the sixteen classes are in no test matrix entry (Allegro, Mochi, AnimateDiff,
PixArt-Sigma, HunyuanVideo, CogView4, SANA, Chroma, FLUX.2 [klein], SkyReels-V2 diffusion forcing;
Lumina2 and QwenImage only in tests/matrix/test_constructor_tensors.py, Z-Image only in
tests/matrix/test_list_inputs.py, HiDream only in tests/matrix/test_stacked_sequences.py, at other
widths); the other two (HunyuanDiT, Stable Audio) are built at other widths and depths. ``wan22``
is Wan2.2-T2V-A14B's layout: two transformers of one config, initialised independently, the second
below 0.875 of the timesteps (tests/matrix/test_expert_split.py has a perturbed copy at 0.6);
``wan22-i2v`` is Wan2.2-I2V-A14B's, with an input image and the boundary at 0.9. The
decoder language models' tokenizers (Llama, GLM, Gemma 2, Qwen2.5-VL, Qwen3) are diffkiln's
word-level stand-in (`lm_tokenizer`).
``--only`` runs some classes; ``--out`` keeps the other classes' rows of an earlier run.

Usage:
    python tools/check_unseen_classes.py --work /tmp/unseen --out tools/results/unseen_classes.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AllegroPipeline,
    AllegroTransformer3DModel,
    AnimateDiffPipeline,
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLAllegro,
    AutoencoderKLFlux2,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLMochi,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
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
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    MochiPipeline,
    MochiTransformer3DModel,
    MotionAdapter,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2Transformer3DModel,
    StableAudioDiTModel,
    StableAudioPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.pipelines.stable_audio import StableAudioProjectionModel
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GlmConfig,
    GlmModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from diffkiln.calibrate import batch_kwargs, source_for
from diffkiln.core.hooks import recording_calls
from diffkiln.core.metrics import sqnr_db
from diffkiln.generation import load_pipeline
from diffkiln.zoo.architectures.components import (
    WORDS,
    clip_encoder,
    clip_tokenizer,
    lm_tokenizer,
    t5_encoder,
    t5_tokenizer,
)
from diffkiln.zoo.architectures.video import tiny_wan

MIN_CALL_SQNR_DB = 20.0
TILED_VAE = {"allegro"}
"""Classes whose VAE decodes only in tiles (``enable_tiling()``; diffusers raises otherwise)."""


def _vae(latent: int = 4, levels: int = 2, **extra: Any) -> AutoencoderKL:
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
        vae=_vae(levels=4),
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
        vae=_vae(),
        text_encoder=clip_encoder(tok, 24),
        tokenizer=tok,
        unet=unet,
        motion_adapter=adapter,
        scheduler=DDIMScheduler(beta_schedule="linear"),
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
        tokenizer=tok, text_encoder=t5_encoder(tok, 24), vae=_vae(), transformer=transformer, scheduler=DDIMScheduler()
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
    return CogView4Pipeline(tokenizer=tok, text_encoder=glm, vae=_vae(levels=2), transformer=transformer,
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
    vae = _vae(levels=2, shift_factor=0.0609, scaling_factor=1.5035)
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
    vae = _vae(latent=16, levels=2, shift_factor=0.1159, scaling_factor=0.3611)
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
    vae = _vae(latent=4, levels=2, shift_factor=0.1159, scaling_factor=0.3611)
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
    vae = _vae(latent=4, levels=2, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
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


CLASSES: dict[str, tuple[Callable[[Path], Any], dict[str, Any]]] = {
    "hunyuan-dit": (hunyuan, {"height": 64, "width": 48, "use_resolution_binning": False}),
    "allegro": (
        allegro,
        {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16, "clean_caption": False},
    ),
    "mochi": (mochi, {"height": 32, "width": 32, "num_frames": 7, "max_sequence_length": 16}),
    "animatediff": (animatediff, {"height": 32, "width": 32, "num_frames": 4}),
    "stable-audio": (stable_audio, {"audio_start_in_s": 0.25, "audio_end_in_s": 1.75}),
    "pixart-sigma": (
        pixart_sigma,
        {"height": 48, "width": 32, "max_sequence_length": 32, "clean_caption": False, "use_resolution_binning": False},
    ),
    "hunyuan-video": (hunyuan_video, {"height": 32, "width": 16, "num_frames": 5, "max_sequence_length": 16}),
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
    "flux2-klein": (flux2_klein, {"height": 32, "width": 48, "max_sequence_length": 16,
                                  "text_encoder_out_layers": [1, 2, 3]}),
    "skyreels-df": (skyreels_df, {"height": 16, "width": 16, "num_frames": 9, "max_sequence_length": 16, "ar_step": 1,
                                  "causal_block_size": 1}),
    # guidance_scale_2: the low-noise expert's own guidance, as Wan 2.2's pipeline takes it.
    "wan22": (wan22, {"height": 16, "width": 32, "num_frames": 5, "max_sequence_length": 16, "guidance_scale_2": 3.0}),
    "wan22-i2v": (wan22_i2v, {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16}),
}


def _flat(out: Any) -> torch.Tensor:
    """A denoiser's output as one tensor (Z-Image returns a list, one tensor per sample)."""
    return torch.cat([t.flatten() for t in out]) if isinstance(out, (list, tuple)) else out


def _per_call(fp: Any, q: Any, call_kwargs: dict[str, Any], name: str) -> list[float]:
    """Per-call SQNR of the bundle's quantized component ``name`` (of ``q``) against the FP one."""
    fp_den, q_den = getattr(fp, name), getattr(q, name)
    source = source_for(fp, ["a green tree beside a small house"], 1)
    fp.set_progress_bar_config(disable=True)
    with recording_calls("check.record", fp_den) as calls, torch.no_grad():
        fp(
            **batch_kwargs(fp, [source.sample(0)], own_media=True),  # one image as it is (Wan image-to-video)
            **call_kwargs,
            num_inference_steps=3,
            output_type="latent",
            generator=torch.Generator().manual_seed(7),
        )
    out = []
    for args, kwargs in calls:
        kwargs = {**kwargs, "return_dict": False}
        with torch.no_grad():
            ref, got = (_flat(den(*args, **kwargs)[0]) for den in (fp_den, q_den))
            out.append(round(float(sqnr_db(ref, got)), 1))
    return out


def _report(bundle: Path, out: Path, tiled: bool) -> dict[str, Any]:
    """``diffkiln report`` on ``bundle`` in a fresh process: its latent SQNR, or its error line."""
    cmd = [sys.executable, "-m", "diffkiln.cli", "report", str(bundle), "--eval-size", "2", "--steps", "4",
           "--out", str(out), "--no-progress", *(["--vae-tiling"] if tiled else [])]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        return {"rc": proc.returncode, "error": errors or proc.stderr.strip().splitlines()[-3:]}
    fidelity = json.loads((out / "report.json").read_text())["fidelity"]
    return {"rc": 0, "latent_sqnr_db": round(fidelity["latent_sqnr_db"], 1)}


def _onnx(bundle: Path, out: Path) -> dict[str, Any]:
    """``diffkiln export BUNDLE --format onnx --denoiser-only`` in a fresh process: the denoiser
    graph's axes and its check against the torch runtime, or the one-line error."""
    cmd = [sys.executable, "-m", "diffkiln.cli", "export", str(bundle), "--format", "onnx", "--denoiser-only",
           "--out", str(out), "--overwrite", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        return {"rc": proc.returncode, "error": errors or proc.stderr.strip().splitlines()[-3:]}
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["components"][manifest["pipeline"]["denoiser"]]
    experts = manifest["pipeline"].get("experts", [])
    return {
        "rc": 0,
        "dynamic_axes": entry["dynamic_axes"] if entry["dynamic"] else None,
        "static_reason": entry.get("static_reason", "")[:200] or None,
        "check_sqnr_db": entry["check"]["sqnr_db"],
        **({"expert_check_sqnr_db": {e: manifest["components"][e]["check"]["sqnr_db"] for e in experts}}
           if experts else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the pipelines and bundles")
    ap.add_argument("--only", help="comma-separated class names (default: all)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = ap.parse_args()
    rows = []
    for name in a.only.split(",") if a.only else CLASSES:
        build, call_kwargs = CLASSES[name]
        folder, bundle = a.work / name, a.work / f"{name}-w8a8"
        if not (folder / "model_index.json").is_file():
            torch.manual_seed(1)
            build(a.work / f"{name}-scratch").save_pretrained(folder)
        args = [arg for k, v in call_kwargs.items() for arg in ("--call-arg", f"{k}={json.dumps(v)}")]
        cmd = [
            sys.executable,
            "-m",
            "diffkiln.cli",
            "optimize",
            str(folder),
            *args,
            "--calib-size",
            "8",
            "--steps",
            "4",
            "--out",
            str(bundle),
            "--overwrite",
            "--no-progress",
            "--cache-dir",
            str(a.work / "cache"),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        row: dict[str, Any] = {
            "class": name,
            "call_kwargs": call_kwargs,
            "rc": proc.returncode,
            "optimize_seconds": round(time.perf_counter() - start, 1),
        }
        if proc.returncode == 0:
            manifest = json.loads((bundle / "manifest.json").read_text())
            fp, q = load_pipeline(str(folder)), load_pipeline(str(bundle))
            row.update(
                pipeline=manifest["pipeline"]["class"],
                denoiser=manifest["pipeline"]["denoiser_class"],
                quantized_layers=len(manifest["quant"]["layers"]),
                fp_layers={n: r.split(":")[0] for n, r in manifest["quant"]["fp_layers"].items()},
                per_call_sqnr_db=_per_call(fp, q, call_kwargs, manifest["pipeline"]["denoiser"]),
            )
            if experts := sorted(manifest.get("experts") or {}):
                row["expert_per_call_sqnr_db"] = {e: _per_call(fp, q, call_kwargs, e) for e in experts}
            tiled = name in TILED_VAE
            row["report"] = _report(bundle, a.work / f"{name}-report", tiled)
            if tiled:
                row["report_without_vae_tiling"] = _report(bundle, a.work / f"{name}-report-untiled", False)
            row["onnx"] = _onnx(bundle, a.work / f"{name}-onnx")
            calls = [*row["per_call_sqnr_db"], *(v for e in row.get("expert_per_call_sqnr_db", {}).values() for v in e)]
            row["ok"] = min(calls) >= MIN_CALL_SQNR_DB and row["report"]["rc"] == 0
        else:
            row["error"] = proc.stderr.strip().splitlines()[-3:]
            row["ok"] = False
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:  # the rows of other classes, from an earlier run, are kept
        ran = {r["class"] for r in rows}
        kept = [r for r in json.loads(a.out.read_text()) if r["class"] not in ran] if a.out.is_file() else []
        order = list(CLASSES)
        merged = sorted([*kept, *rows], key=lambda r: order.index(r["class"]) if r["class"] in order else len(order))
        a.out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} classes within {MIN_CALL_SQNR_DB} dB on every call")


if __name__ == "__main__":
    main()
