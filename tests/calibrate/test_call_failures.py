"""A failure inside a pipeline call is named with the component that raised when it is the model's
own code, and left as it is when it is diffkiln's (a bug to report with its traceback)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diffkiln.calibrate.sources import pipeline_call_hints
from diffkiln.core.errors import InvalidInputError, PipelineCallError
from diffkiln.core.metrics import sqnr_db
from diffkiln.zoo.architectures.components import tiny_vae


class _Pipe:
    """The parts of a diffusers pipeline the attribution reads: its components."""

    def __init__(self, **components: Any):
        self.components = components

    def __call__(self, fn: Any) -> Any:
        return fn()


def _call(pipe: _Pipe, fn: Any, samples: int = 1) -> Any:
    with pipeline_call_hints(pipe, [{"prompt": "x"}] * samples, 2, {"num_inference_steps": 2, "height": 32}):
        return pipe(fn)


def test_the_models_own_failure_names_the_component_and_the_function() -> None:
    vae = tiny_vae()
    pipe = _Pipe(vae=vae, scheduler=object())
    wrong = torch.zeros(1, 5, 32, 32)  # 5 channels into a 3-channel encoder: diffusers' code raises
    with pytest.raises(PipelineCallError) as info:
        _call(pipe, lambda: vae.encode(wrong))
    message = str(info.value)
    # The innermost frame in the model's own code whose ``self`` is one of the pipeline's modules.
    assert message.startswith("_Pipe failed in its vae (Encoder.forward): RuntimeError: "), message
    assert "--vae-tiling" in message  # an autoencoder with tiled decoding off: the one fix known
    assert "--batch-size 1" not in message  # one sample in the call
    assert isinstance(info.value.__cause__, RuntimeError)


def test_an_autoencoder_failing_on_several_samples_gets_one_per_call_as_a_fix() -> None:
    # HunyuanVideo 1.5's VAE (diffusers 0.42) fails on a batch of two clips, not on one.
    vae = tiny_vae()
    with pytest.raises(PipelineCallError, match=r"this call had 2\), decode one per call: --batch-size 1"):
        _call(_Pipe(vae=vae), lambda: vae.encode(torch.zeros(2, 5, 32, 32)), samples=2)


def test_a_component_without_tiling_gets_the_call_arguments_to_check() -> None:
    linear = torch.nn.Linear(4, 4)
    pipe = _Pipe(transformer=linear)
    with pytest.raises(PipelineCallError) as info:
        _call(pipe, lambda: linear(torch.zeros(2, 3)))
    message = str(info.value)
    assert "failed in its transformer (Linear.forward)" in message and "--vae-tiling" not in message
    assert "the call arguments diffkiln passed (height, num_inference_steps)" in message


class _SizedBlock(torch.nn.Module):
    """A model that takes only sizes up to 16 tokens (HiDream pads its patches to a fixed count)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros(16, 4)
        padded[: hidden_states.shape[0]] = self.proj(hidden_states)
        return padded


def test_the_models_failure_under_the_data_flow_trace_is_the_models() -> None:
    from diffkiln.calibrate.dataflow import trace_dataflow

    block = _SizedBlock()
    pipe = _Pipe(transformer=block)
    # The trace runs the model under a torch-function mode: its frame forwards the model's own call
    # and must not make the failure diffkiln's (a traceback instead of the one line naming it).
    with pytest.raises(PipelineCallError) as info:
        _call(pipe, lambda: trace_dataflow(block, (torch.zeros(20, 4),), {}))
    assert "failed in its transformer (_SizedBlock.forward)" in str(info.value), str(info.value)


def test_diffkilns_own_failure_and_typed_errors_stay_as_they_are() -> None:
    pipe = _Pipe(transformer=torch.nn.Linear(4, 4))
    # sqnr_db is diffkiln's: the shape error inside it is raised as it is, with its traceback.
    with pytest.raises(ValueError, match="shapes differ") as info:
        _call(pipe, lambda: sqnr_db(torch.ones(2), torch.ones(3)))
    assert not isinstance(info.value, PipelineCallError)
    for error in (InvalidInputError("named"), OSError(28, "No space left on device"), MemoryError()):

        def fail(e: BaseException = error) -> None:
            raise e

        with pytest.raises(type(error)) as caught:
            _call(pipe, fail)
        assert caught.value is error


def test_a_name_a_missing_package_leaves_undefined_names_the_package() -> None:
    pipe = _Pipe(transformer=torch.nn.Linear(4, 4))

    def uses_a_missing_package() -> None:
        raise NameError("name 'not_installed_pkg_xyz' is not defined", name="not_installed_pkg_xyz")

    with pytest.raises(PipelineCallError, match="uses the package 'not_installed_pkg_xyz', which is not installed"):
        _call(pipe, uses_a_missing_package)


def test_outputs_of_calls_on_consecutive_samples_join_along_the_batch() -> None:
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    from diffkiln.calibrate.pipeline_calls import joined_output

    parts = [StableDiffusionPipelineOutput(images=torch.full((1, 3), float(i)), nsfw_content_detected=None)
             for i in range(3)]  # fmt: skip
    joined = joined_output(parts)
    assert type(joined) is StableDiffusionPipelineOutput and torch.equal(joined.images[:, 0], torch.arange(3.0))
    assert joined_output([([1], "x"), ([2], "x")]) == ([1, 2], "x")


def test_a_required_input_diffkiln_cannot_make_is_named(tmp_path: Any) -> None:
    # Kandinsky 2.2's decoder takes image embeddings from its prior pipeline: tensors, no prompt.
    from diffusers import DDIMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    from diffkiln.api import OptimizeConfig, optimize

    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj", layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", norm_num_groups=8,
    )  # fmt: skip
    movq = VQModel(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, layers_per_block=1,
        norm_num_groups=8, norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4,
    )  # fmt: skip
    KandinskyV22Pipeline(unet=unet, scheduler=DDIMScheduler(), movq=movq).save_pretrained(tmp_path / "kd")
    config = OptimizeConfig(out=tmp_path / "b", calib_size=2, steps=2, progress=False)
    with pytest.raises(PipelineCallError) as info:
        optimize(str(tmp_path / "kd"), config)
    message = str(info.value)
    assert "missing 2 required positional arguments: 'image_embeds' and 'negative_image_embeds'" in message
    assert "a tensor input (another pipeline's output" in message and "is not supported" in message
    assert not (tmp_path / "b").exists()
