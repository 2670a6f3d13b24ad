"""Video architecture: Wan 2.1 (UMT5 text encoder, 3D-patch transformer, causal video VAE)."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from diffkiln.zoo.architectures.components import t5_encoder, t5_tokenizer

__all__ = ["full_wan_transformer", "tiny_wan"]


def tiny_wan(scratch: Path) -> WanPipeline:
    """Wan 2.1 layout at toy width. Call it with small ``height``/``width``/``num_frames`` (16, 16, 5).

    Args:
        scratch: a folder for the tokenizer files.
    """
    tok = t5_tokenizer(scratch / "tokenizer")
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    return WanPipeline(
        tokenizer=tok,
        text_encoder=t5_encoder(tok, 32, umt5=True),
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def full_wan_transformer() -> WanTransformer3DModel:
    """The Wan 2.1 T2V 1.3B transformer config, random weights."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=30,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
