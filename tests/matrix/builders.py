"""Tiny random-weight pipelines of diffusers denoiser classes the built-in models do not cover.

Each is the real diffusers pipeline and model classes at toy widths (text encoders and
tokenizers from diffkiln's own word list, no download). Together with the built-in tiny models they
form the test matrix: every stage must work on each without knowing its class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AuraFlowPipeline,
    AuraFlowTransformer2DModel,
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    AutoencoderKLTemporalDecoder,
    AutoencoderOobleck,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EDMDPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    LattePipeline,
    LatteTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    StableAudioDiTModel,
    StableAudioPipeline,
    StableVideoDiffusionPipeline,
    TextToVideoSDPipeline,
    UNet2DModel,
    UNet3DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.pipelines.stable_audio import StableAudioProjectionModel
from transformers import BertConfig, BertModel, BertTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection

from diffkiln.zoo.architectures.components import WORDS, clip_encoder, clip_tokenizer, t5_encoder, t5_tokenizer

__all__ = ["MATRIX", "Lazy", "MatrixEntry", "build", "optimized", "save_built"]


@dataclass(frozen=True)
class MatrixEntry:
    """One tiny pipeline of the matrix.

    Attributes:
        name: short name.
        build: ``scratch folder -> pipeline`` (seeded by the caller).
        call_kwargs: the pipeline-call arguments its size needs.
        second_call_kwargs: another shape (for the ONNX export's second run); None when the model
            has only one (e.g. a fixed patch grid).
        kind: "image", "video", "image-to-video", "audio", "class", "unconditional".
    """

    name: str
    build: Callable[[Path], Any]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    second_call_kwargs: dict[str, Any] | None = None
    kind: str = "image"


def _tiny_kl_vae(latent_channels: int = 4, levels: int = 2) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8,) * (levels - 1) + (16,),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )


def _bert_tokenizer(folder: Path) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS)), *"abcdefghijklmnopqrstuvwxyz"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizer(str(folder / "vocab.txt"), model_max_length=77)


def cogvideox(scratch: Path) -> CogVideoXPipeline:
    """CogVideoX text-to-video: T5, a 3D transformer with 3D positional embeddings, a causal 3D VAE."""
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=32,
        num_layers=2,
        sample_width=4,
        sample_height=4,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=32,
    )
    # An 8x VAE: at 32x32 pixels and 9 frames the latent grid is the transformer's own (4x4x3), where
    # its positional table is a buffer; at other sizes forward rebuilds it (written through
    # ``.data``), the path the ONNX export's second trace takes.
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=tok, text_encoder=t5_encoder(tok, 32), vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )


def ltx(scratch: Path) -> LTXPipeline:
    """LTX-Video text-to-video: T5, a 3D transformer over patchified latent tokens, a video VAE."""
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        caption_channels=32,
    )
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4,
        # As LTX 0.9.1 and later: the decoder takes the decode timestep (a tensor argument of
        # decode), scaled by a 0-d parameter.
        timestep_conditioning=True,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    # Real checkpoints hold per-channel statistics here (buffers, not config), which the pipeline
    # reads to denormalize the latents before decoding.
    with torch.no_grad():
        vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=t5_encoder(tok, 32),
        tokenizer=tok,
        transformer=transformer,
    )


def svd(scratch: Path) -> StableVideoDiffusionPipeline:
    """Stable Video Diffusion image-to-video: a CLIP vision encoder and a spatio-temporal UNet."""
    from transformers import CLIPImageProcessor

    # Its group norms have 32 groups: 32 channels at least.
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=16,
        num_attention_heads=2,
        projection_class_embeddings_input_dim=24,
        addition_time_embed_dim=8,
        num_frames=4,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    # Its decoder's group norms have 32 groups: 32 channels at least.
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4, layers_per_block=1
    )
    image_encoder = CLIPVisionModelWithProjection(
        # The pipeline resizes every image to 224 px for the encoder.
        CLIPVisionConfig(
            hidden_size=16,
            projection_dim=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            intermediate_size=32,
            patch_size=32,
        )
    )
    processor = CLIPImageProcessor(crop_size=16, size=16)
    return StableVideoDiffusionPipeline(
        vae=vae, image_encoder=image_encoder, unet=unet, scheduler=scheduler, feature_extractor=processor
    )


def stable_audio(scratch: Path) -> StableAudioPipeline:
    """Stable Audio text-to-audio: T5 plus a projection model, an audio DiT, the Oobleck VAE."""
    tok = t5_tokenizer(scratch / "tokenizer")
    text_encoder = t5_encoder(tok, 16)
    transformer = StableAudioDiTModel(
        sample_size=8,
        in_channels=3,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        num_key_value_attention_heads=1,
        out_channels=3,
        cross_attention_dim=8,
        time_proj_dim=8,
        global_states_input_dim=16,
        cross_attention_input_dim=8,
    )
    vae = AutoencoderOobleck(
        encoder_hidden_size=6,
        downsampling_ratios=[1, 2],
        decoder_channels=3,
        decoder_input_channels=3,
        audio_channels=2,
        channel_multiples=[2, 4],
        sampling_rate=16,
    )
    projection = StableAudioProjectionModel(text_encoder_dim=16, conditioning_dim=8, min_value=0, max_value=32)
    # Stable Audio's own cosine scheduler needs torchsde; the EDM DPM-Solver is the same family.
    scheduler = EDMDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction", sigma_data=1.0)
    return StableAudioPipeline(
        vae=vae,
        text_encoder=text_encoder,
        projection_model=projection,
        tokenizer=tok,
        transformer=transformer,
        scheduler=scheduler,
    )


def hunyuan_dit(scratch: Path) -> HunyuanDiTPipeline:
    """HunyuanDiT: a BERT and a T5 text encoder, an attention-pool text embedder, skip connections."""
    bert_tok = _bert_tokenizer(scratch / "bert")
    bert = BertModel(
        BertConfig(
            vocab_size=len(bert_tok),
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=80,
        )
    )
    t5tok = t5_tokenizer(scratch / "t5")
    transformer = HunyuanDiT2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        cross_attention_dim=16,
        cross_attention_dim_t5=32,
        pooled_projection_dim=8,
        hidden_size=16,
        text_len=77,
        text_len_t5=256,
        activation_fn="gelu-approximate",
    )
    # The pipeline's rotary grid assumes an 8x VAE: four levels.
    return HunyuanDiTPipeline(
        vae=_tiny_kl_vae(levels=4),
        text_encoder=bert,
        tokenizer=bert_tok,
        transformer=transformer,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=t5_encoder(t5tok, 32),
        tokenizer_2=t5tok,
    )


def aura_flow(scratch: Path) -> AuraFlowPipeline:
    """AuraFlow: UMT5, joint (MMDiT) and single DiT blocks with register tokens."""
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = AuraFlowTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=64,
    )
    return AuraFlowPipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(tok, 32, umt5=True),
        vae=_tiny_kl_vae(),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def latte(scratch: Path) -> LattePipeline:
    """Latte text-to-video: T5, alternating spatial and temporal transformer blocks (adaLN-single)."""
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = LatteTransformer3DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=2,  # its temporal position table has one row per frame
    )
    return LattePipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(tok, 32),
        vae=_tiny_kl_vae(),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def text_to_video_sd(scratch: Path) -> TextToVideoSDPipeline:
    """ModelScope text-to-video: CLIP, a 3D UNet with temporal convolutions (Conv3d) and attention."""
    tok = clip_tokenizer(scratch / "tokenizer")
    unet = UNet3DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    return TextToVideoSDPipeline(
        vae=_tiny_kl_vae(), text_encoder=clip_encoder(tok, 32), tokenizer=tok, unet=unet, scheduler=DDIMScheduler()
    )


def dit(scratch: Path) -> DiTPipeline:
    """DiT class-conditional image generation: no text at all, adaLN-zero with class labels."""
    del scratch
    transformer = DiTTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    return DiTPipeline(transformer=transformer, vae=_tiny_kl_vae(), scheduler=DDIMScheduler())


def ddpm(scratch: Path) -> DDPMPipeline:
    """DDPM unconditional image generation: a pixel-space UNet2DModel, no conditioning but the timestep."""
    del scratch
    unet = UNet2DModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))


_T5 = {"max_sequence_length": 32}

MATRIX: dict[str, MatrixEntry] = {
    e.name: e
    for e in (
        MatrixEntry(
            "cogvideox",
            cogvideox,
            {"height": 32, "width": 32, "num_frames": 9, **_T5},
            {"height": 64, "width": 48, "num_frames": 13, **_T5},
            "video",
        ),
        MatrixEntry(
            "ltx",
            ltx,
            {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16},
            {"height": 64, "width": 96, "num_frames": 13, "max_sequence_length": 16},
            "video",
        ),
        MatrixEntry(
            "svd",
            svd,
            {"height": 32, "width": 32, "num_frames": 4, "decode_chunk_size": 4},
            {"height": 48, "width": 64, "num_frames": 5, "decode_chunk_size": 4},
            "image-to-video",
        ),
        MatrixEntry("stable-audio", stable_audio, {"audio_end_in_s": 1.0}, {"audio_end_in_s": 0.5}, "audio"),
        MatrixEntry(
            "hunyuan-dit",
            hunyuan_dit,
            {"height": 32, "width": 32, "use_resolution_binning": False},
            {"height": 48, "width": 64, "use_resolution_binning": False},
        ),
        MatrixEntry("aura-flow", aura_flow, {"height": 32, "width": 32, **_T5}, {"height": 48, "width": 64, **_T5}),
        MatrixEntry(
            "latte",
            latte,
            {"height": 32, "width": 32, "video_length": 2, "clean_caption": False},
            {"height": 48, "width": 64, "video_length": 2, "clean_caption": False},
            "video",
        ),
        MatrixEntry(
            "text-to-video-sd",
            text_to_video_sd,
            {"height": 32, "width": 32, "num_frames": 2},
            {"height": 48, "width": 64, "num_frames": 3},
            "video",
        ),
        MatrixEntry("dit", dit, {}, None, "class"),
        MatrixEntry("ddpm", ddpm, {}, None, "unconditional"),
    )
}
"""The extra tiny pipelines, by name."""


def build(name: str, folder: Path, seed: int = 0) -> Path:
    """Build ``name`` with ``seed`` and save it as a diffusers folder at ``folder`` (once)."""
    return save_built(MATRIX[name].build, folder, seed)


def wan22_experts(scratch: Path) -> Any:
    """Tiny Wan with a second expert, as Wan 2.2's ``transformer_2``: the first's weights perturbed,
    the boundary at 0.6 (with 4 steps: two on each expert)."""
    import copy

    from diffusers import WanPipeline

    from diffkiln.zoo.architectures.video import tiny_wan

    base = tiny_wan(scratch)
    expert = copy.deepcopy(base.transformer)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       transformer=base.transformer, scheduler=base.scheduler, transformer_2=expert,
                       boundary_ratio=0.6)  # fmt: skip


def save_built(make: Callable[[Path], Any], folder: Path, seed: int = 0) -> Path:
    """``make(scratch)`` with ``seed`` (the caller's random state left as it was), saved as a
    diffusers folder at ``folder`` (once)."""
    if (folder / "model_index.json").is_file():
        return folder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = make(folder.parent / f"{folder.name}-scratch")
    pipe.save_pretrained(folder)
    return folder


def optimized(
    make: Callable[[Path], Any], root: Path, call: dict[str, Any], calib_size: int, steps: int
) -> tuple[Path, Path]:
    """``make``'s pipeline saved under ``root`` (:func:`save_built`) and its W8A8 bundle, built with
    the call arguments ``call``: (folder, bundle)."""
    from diffkiln.api import OptimizeConfig, optimize

    folder = save_built(make, root / "folder")
    config = OptimizeConfig(out=root / "bundle", calib_size=calib_size, steps=steps, progress=False,
                            call_kwargs=tuple(call.items()))  # fmt: skip
    return folder, optimize(str(folder), config)


class Lazy(dict[str, Path]):
    """Folders built on first use, so a selection of the tests builds only its own classes."""

    def __init__(self, make: Callable[[str], Path]):
        super().__init__()
        self.make = make

    def __missing__(self, name: str) -> Path:
        self[name] = self.make(name)
        return self[name]
