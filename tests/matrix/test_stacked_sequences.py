"""A denoiser that reads several hidden layers of one language model, stacked in front of the
batch: HiDream's transformer takes ``encoder_hidden_states_llama3`` as (layers, batch, length,
width) and projects chosen layers (``caption_projection.<i>``). The data flow must count it a text
sequence: its BOS row (Llama's, an activation outlier in the real model) went unverified, so the
projections of those layers got no BOS rows. HiDream also routes tokens to mixture-of-experts
feed-forwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline
from diffusers import HiDreamImageTransformer2DModel as HiDreamTransformer
from transformers import LlamaConfig, LlamaForCausalLM

from diffkiln.generation import load_pipeline
from diffkiln.zoo.architectures.components import clip_encoder, clip_tokenizer, lm_tokenizer, t5_encoder, t5_tokenizer
from tests.matrix.builders import optimized
from tests.matrix.per_call import per_call_sqnr

CALL = {"height": 32, "width": 32, "max_sequence_length": 16}
# Per-call SQNR of the W8A8 denoiser against FP on a held-out prompt: measured 52.4 to 52.5 dB.
MIN_CALL_SQNR_DB = 20.0


def _hidream(scratch: Path) -> HiDreamImagePipeline:
    """HiDream-I1 at toy widths: two CLIPs (pooled), T5 and a Llama read at two hidden layers, a
    double- and single-stream DiT with routed experts."""
    tok, tok_2, tok_3, tok_4 = (clip_tokenizer(scratch / "clip"), clip_tokenizer(scratch / "clip2"),
                                t5_tokenizer(scratch / "t5"), lm_tokenizer(128))  # fmt: skip
    transformer = HiDreamTransformer(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
                                     attention_head_dim=8, num_attention_heads=4, caption_channels=[32, 16],
                                     text_emb_dim=64, num_routed_experts=4, num_activated_experts=2,
                                     axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
                                     llama_layers=(0, 1))  # fmt: skip
    vae = AutoencoderKL(block_out_channels=[16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=32, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, scaling_factor=0.3611,
                        shift_factor=0.1159)  # fmt: skip
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tok_4),
                                         pad_token_id=0))  # fmt: skip
    return HiDreamImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
                                text_encoder=clip_encoder(tok, 32, 32), tokenizer=tok,
                                text_encoder_2=clip_encoder(tok_2, 32, 32), tokenizer_2=tok_2,
                                text_encoder_3=t5_encoder(tok_3, 32), tokenizer_3=tok_3, text_encoder_4=llama,
                                tokenizer_4=tok_4)  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return optimized(_hidream, tmp_path_factory.mktemp("stacked"), CALL, calib_size=2, steps=2)


def test_the_llama_layers_bos_row_reaches_their_projections(built: tuple[Path, Path]) -> None:
    manifest = json.loads((built[1] / "manifest.json").read_text())
    # The word-level stand-in starts every text with <bos>; a causal Llama gives it one row in every
    # layer for every prompt. T5 has no BOS: its sequence has no invariant position.
    assert manifest["bos"]["positions"] == [0], manifest["bos"]
    with_bos = {n for n, info in manifest["quant"]["layers"].items() if info["bos_positions"]}
    assert with_bos == {"caption_projection.0.linear", "caption_projection.1.linear"}, with_bos


def test_the_bundle_follows_the_fp_denoiser_call_by_call(built: tuple[Path, Path]) -> None:
    folder, bundle = built
    values = per_call_sqnr(load_pipeline(str(folder)), load_pipeline(str(bundle)), CALL)
    print(f"hidream: per-call SQNR {values} dB")
    assert min(values) >= MIN_CALL_SQNR_DB, values
