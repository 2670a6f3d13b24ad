"""The shapes-video architecture: stock diffusers classes that load with no custom code, sized so
the denoiser's attention sees at least 1,000 video tokens over at least 8 latent frames."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, WanPipeline

from diffkiln.zoo.shapes.video import VIDEO_FRAMES
from diffkiln.zoo.shapes_video_model import VIDEO_TEXT_LENGTH, assemble_shapes_video, video_tokens_per_sample


def test_the_pipeline_loads_with_plain_diffusers_and_sees_enough_tokens(tmp_path: Path) -> None:
    assemble_shapes_video(tmp_path / "scratch").save_pretrained(tmp_path / "pipe")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe, WanPipeline)
    pipe.set_progress_bar_config(disable=True)
    patches: list[tuple[int, ...]] = []
    handle = pipe.transformer.patch_embedding.register_forward_hook(lambda m, a, o: patches.append(tuple(o.shape)))
    gen = torch.Generator().manual_seed(0)
    out = pipe("a red circle moving right", num_frames=VIDEO_FRAMES - 1, height=64, width=64, num_inference_steps=1,
               max_sequence_length=VIDEO_TEXT_LENGTH, output_type="np", generator=gen)  # fmt: skip
    handle.remove()
    assert out.frames.shape == (1, VIDEO_FRAMES, 64, 64, 3)
    _, _, frames, h, w = patches[0]
    assert frames * h * w == video_tokens_per_sample()[0] >= 1000 and frames >= 8
