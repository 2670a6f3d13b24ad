"""Pipelines that start from an input image: image-to-image and inpainting classes built tiny.

Their ``image`` (and ``mask_image``) defaults to None: only the ``strength`` or the ``mask_image``
beside it says that a call needs one (without one, the pipeline's own preprocessing fails). Each
class is optimized from its folder with no argument but its own, its bundle loads as the same
class, and a call on a user's image (and mask) gives what the FP pipeline gives on it, within a
threshold set from measurement. A ControlNet, whose control image nothing in the signature marks
as needed, is calibrated on the user's image.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from diffkiln.api import InputFiles, OptimizeConfig, optimize
from diffkiln.core.metrics import sqnr_db
from diffkiln.export.onnx import OnnxExportConfig
from diffkiln.generation import GenerateConfig, generate, load_pipeline
from diffkiln.zoo.catalog import TINY_T5_LENGTH
from diffkiln.zoo.registry import resolve_target
from tests.matrix.builders import Lazy

# name: (tiny built-in it takes its components from, pipeline class, denoiser config changes).
# A 9-channel UNet (SD inpainting checkpoints: latents, mask, masked-image latents) and FLUX Fill's
# transformer (packed latents, masked-image latents and mask: three times the packed channels) read
# the mask through their input projection; the others blend (SDXL) or only start from the image.
CLASSES: dict[str, tuple[str, str, dict[str, int]]] = {
    "sd15-img2img": ("tiny-sd15", "StableDiffusionImg2ImgPipeline", {}),
    "sd15-inpaint-9ch": ("tiny-sd15", "StableDiffusionInpaintPipeline", {"in_channels": 9}),
    "sdxl-inpaint": ("tiny-sdxl", "StableDiffusionXLInpaintPipeline", {}),
    "sd3-img2img": ("tiny-sd3", "StableDiffusion3Img2ImgPipeline", {}),
    "flux-fill": ("tiny-flux", "FluxFillPipeline", {"in_channels": 48, "out_channels": 16}),
}
T5 = {"max_sequence_length": TINY_T5_LENGTH}
# FLUX Fill's default size is 1024 px of a full VAE (256 px of the tiny one): 32 px, as the others.
CALL_KWARGS = {"sd3-img2img": T5, "flux-fill": {**T5, "height": 32, "width": 32}}
# Bundle against FP on the same image, mask and seed: measured 26-62 dB on the final latents.
MIN_LATENT_SQNR_DB = 18.0


def build_image_class(name: str, out: Path) -> Path:
    """The class ``name`` of :data:`CLASSES`, saved as a diffusers folder at ``out``."""
    base, cls, changes = CLASSES[name]
    pipe = getattr(diffusers, cls).from_pretrained(resolve_target(base).path)
    if changes:
        component = "unet" if "unet" in pipe.components else "transformer"
        denoiser = getattr(pipe, component)
        torch.manual_seed(0)
        pipe.register_modules(**{component: type(denoiser).from_config({**denoiser.config, **changes})})
    pipe.save_pretrained(out)
    return out


def _images(folder: Path) -> tuple[Path, Path, Path]:
    """Two input images (a red disc on blue, a yellow bar on green) and a mask over their right half."""
    yy, xx = np.mgrid[0:32, 0:32]
    a = np.where((((yy - 12) ** 2 + (xx - 12) ** 2) < 64)[..., None], [220, 40, 40], [30, 90, 200])
    b = np.where(((np.abs(yy - 16) < 4) & (xx > 4))[..., None], [230, 210, 30], [40, 160, 60])
    paths = folder / "a.png", folder / "b.png", folder / "mask.png"
    Image.fromarray(a.astype(np.uint8)).save(paths[0])
    Image.fromarray(b.astype(np.uint8)).save(paths[1])
    Image.fromarray(np.where(xx >= 16, 255, 0).astype(np.uint8)).save(paths[2])
    return paths


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each class's folder and bundle (``optimize`` with its own call arguments only), on first use."""
    root = tmp_path_factory.mktemp("image-conditioned")

    def make(name: str) -> Path:
        folder = build_image_class(name, root / name / "folder")
        config = OptimizeConfig(out=root / name / "bundle", calib_size=2, steps=2, progress=False,
                                call_kwargs=tuple(CALL_KWARGS.get(name, {}).items()))  # fmt: skip
        optimize(str(folder), config)
        return root / name

    return Lazy(make)


def _latents(pipe: Any, name: str, image: Path, mask: Path | None) -> torch.Tensor:
    config = GenerateConfig(steps=3, guidance=4.0, progress=False, call_kwargs=tuple(CALL_KWARGS.get(name, {}).items()))
    inputs = InputFiles.of([image], [mask] if mask is not None else [])
    result = generate(pipe, ["a red circle"], config, measure=True, inputs=inputs)
    return result.extras["latents"].float()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_an_image_conditioned_class_is_calibrated_on_images_and_runs_from_its_bundle(
    name: str, built: dict[str, Path], tmp_path: Path
) -> None:
    root = built[name]
    cls = CLASSES[name][1]
    inpaint = "mask_image" in inspect.signature(getattr(diffusers, cls).__call__).parameters
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    recorded = manifest["plan"]["notes"]["calibration"]["source"]["images"]
    assert recorded is not None and recorded["kind"] == "image", recorded
    assert recorded.get("masks", False) == inpaint, recorded

    fp, q = load_pipeline(str(root / "folder")), load_pipeline(str(root / "bundle"))
    assert type(q).__name__ == type(fp).__name__ == cls
    a, b, mask = _images(tmp_path)
    m = mask if inpaint else None
    fp_a, q_a = _latents(fp, name, a, m), _latents(q, name, a, m)
    sqnr = sqnr_db(fp_a, q_a)
    print(f"{name}: bundle against FP on the same image: {sqnr:.1f} dB")
    assert sqnr >= MIN_LATENT_SQNR_DB, (name, sqnr)
    # The input image reaches the denoiser: another image changes the result more than quantization
    # does (by 3 dB on the 9-channel UNet, where at strength 1 only the masked image carries it;
    # by 9 dB or more on the others).
    fp_b, q_b = _latents(fp, name, b, m), _latents(q, name, b, m)
    assert sqnr_db(fp_a, fp_b) < sqnr and sqnr_db(q_a, q_b) < sqnr, (sqnr_db(fp_a, fp_b), sqnr_db(q_a, q_b))


def test_an_inpainting_bundle_runs_from_its_onnx_folder(built: dict[str, Path], tmp_path: Path) -> None:
    from diffkiln.api import convert
    from diffkiln.runtime.onnxruntime_backend import load_onnx_pipeline

    root = built["sd15-inpaint-9ch"]
    out = convert(root / "bundle", OnnxExportConfig(tmp_path / "onnx", dynamic=False, progress=False))
    # The VAE encoder is exported: the pipeline encodes the masked image into the UNet's input.
    assert (out / "vae_encoder.onnx").is_file()
    a, _, mask = _images(tmp_path)
    ort, q = load_onnx_pipeline(out, torch.device("cpu")), load_pipeline(str(root / "bundle"))
    got, ref = _latents(ort, "sd15-inpaint-9ch", a, mask), _latents(q, "sd15-inpaint-9ch", a, mask)
    assert sqnr_db(ref, got) >= 30.0, sqnr_db(ref, got)


def test_generate_takes_the_users_image_and_mask_from_the_command_line(
    built: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffkiln.cli import main

    bundle = str(built["sd15-inpaint-9ch"] / "bundle")
    a, b, mask = _images(tmp_path)
    args = ["generate", bundle, "--prompt", "a red circle", "--prompt", "a blue square", "--steps", "2"]
    args += ["--no-progress", "--image", str(a)]
    assert main([*args, "--image", str(b), "--mask-image", str(mask), "--out", str(tmp_path / "o")]) == 0
    written = sorted((tmp_path / "o").glob("*.png"))
    assert [p.name for p in written] == ["0000_a-red-circle.png", "0001_a-blue-square.png"]
    # Each prompt took its own image: the same call through the API on the second image gives the second file.
    config = GenerateConfig(steps=2, seed=1, progress=False)
    again = generate(load_pipeline(bundle), ["a blue square"], config, inputs=InputFiles.of([b], [mask])).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(written[1]).convert("RGB")))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: StableDiffusionInpaintPipeline repaints under a mask: give a mask file too "
                   "(--mask-image or --calib-mask-image FILE: white repaints, black keeps)"], err  # fmt: skip
    assert not (tmp_path / "p").exists()


def test_optimize_calibrates_on_the_users_images_and_the_search_replays_them(tmp_path: Path) -> None:
    from diffkiln.calibrate import source_from_description
    from diffkiln.cli import main

    folder = build_image_class("sd15-inpaint-9ch", tmp_path / "folder")
    a, b, mask = _images(tmp_path)
    out = tmp_path / "cached"
    # The cache recipe replays the calibration's own calls to validate its schedules.
    args = ["optimize", str(folder), "--recipe", "cache", "--cache-budget", "0.5", "--calib-size", "3", "--steps", "4"]
    args += ["--calib-image", str(a), "--calib-image", str(b), "--calib-mask-image", str(mask), "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    recorded = json.loads((out / "manifest.json").read_text())["plan"]["notes"]["calibration"]["source"]["images"]
    assert recorded["kind"] == "image_files" and recorded["images"] == [str(a), str(b)], recorded
    assert recorded["masks"] == [str(mask)] and len(recorded["sha256"]) == 3
    replayed = source_from_description(recorded, files=True)
    assert np.array_equal(np.asarray(replayed.sample(2)["image"]), np.asarray(Image.open(a).convert("RGB")))
    pipe = load_pipeline(str(out))
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.diffkiln_cache is not None


def _controlnet_pipeline(cls: str) -> Any:
    """A tiny SD ControlNet pipeline of class ``cls``: the ControlNet copied from the UNet."""
    base = diffusers.StableDiffusionPipeline.from_pretrained(resolve_target("tiny-sd15").path)
    torch.manual_seed(0)
    controlnet = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():  # its zero convolutions, as trained ones are not: the control image reaches the UNet
        for p in controlnet.parameters():
            if not p.any():
                p.normal_(0.0, 0.5)
    parts = {k: base.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return getattr(diffusers, cls)(**parts, controlnet=controlnet, **extra)


def test_a_strength_that_leaves_no_step_is_named_and_the_denoiser_probe_runs_every_step(tmp_path: Path) -> None:
    from diffkiln.core.errors import InvalidInputError

    # SDXL image-to-image starts at strength 0.3: 2 steps run none of them (diffusers fails on it).
    sdxl = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(resolve_target("tiny-sdxl").path)
    sdxl.save_pretrained(tmp_path / "sdxl")
    config = OptimizeConfig(out=tmp_path / "b", calib_size=2, steps=2, progress=False)
    with pytest.raises(InvalidInputError, match=r"at strength 0.3, 2 steps leave none to run; give more steps"):
        optimize(str(tmp_path / "sdxl"), config)
    assert not (tmp_path / "b").exists()
    assert optimize(str(tmp_path / "sdxl"), replace(config, steps=4)).is_dir()
    # A ControlNet image-to-image pipeline has two candidates, told apart by their calls at 2 and
    # 3 steps: at strength 0.5 both would run 1 step; the probe runs them at strength 1. Its control
    # image is the user's to give: none is made up, and the failure names the option.
    from diffkiln.cli import main

    _controlnet_pipeline("StableDiffusionControlNetImg2ImgPipeline").save_pretrained(tmp_path / "cn")
    a, b, _ = _images(tmp_path)
    args = ["optimize", str(tmp_path / "cn"), "--calib-size", "2", "--steps", "4", "--call-arg", "strength=0.5"]
    args += ["--no-progress", "--out", str(tmp_path / "cn-b")]
    config = replace(config, out=tmp_path / "cn-b", steps=4, call_kwargs=(("strength", 0.5),))
    with pytest.raises(InvalidInputError, match=r"without an input control_image .* --calib-control-image FILE"):
        optimize(str(tmp_path / "cn"), config)
    assert main([*args, "--calib-image", str(a), "--calib-control-image", str(b)]) == 0
    manifest = json.loads((tmp_path / "cn-b" / "manifest.json").read_text())
    assert manifest["plan"]["denoiser"] == "unet"
    # The ControlNet also runs at every step, in floating point, and the record says so.
    evidence = manifest["plan"]["notes"]["calibration"]["denoiser_evidence"]
    assert evidence.endswith("also run in the sampler loop, kept in floating point: controlnet"), evidence
    recorded = manifest["plan"]["notes"]["calibration"]["source"]["images"]
    assert recorded["images"] == [str(a)] and recorded["controls"] == [str(b)], recorded


def test_a_controlnet_asks_for_its_control_image_then_runs_on_it(tmp_path: Path) -> None:
    from diffkiln.core.errors import InvalidInputError

    _controlnet_pipeline("StableDiffusionControlNetPipeline").save_pretrained(tmp_path / "folder")
    a, b, _ = _images(tmp_path)
    config = OptimizeConfig(out=tmp_path / "bundle", calib_size=2, steps=2, progress=False)
    # Its control image is optional in the signature: none is made up, and the failure names the fix.
    with pytest.raises(InvalidInputError, match=r"failed without an input image .*--calib-image FILE"):
        optimize(str(tmp_path / "folder"), config)
    assert not (tmp_path / "bundle").exists()
    bundle = optimize(str(tmp_path / "folder"), replace(config, calib_inputs=InputFiles.of([a])))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["plan"]["denoiser"] == "unet"  # the ControlNet runs beside it, in float
    fp, q = load_pipeline(str(tmp_path / "folder")), load_pipeline(str(tmp_path / "bundle"))
    fp_a, q_a = _latents(fp, "controlnet", a, None), _latents(q, "controlnet", a, None)
    assert sqnr_db(fp_a, q_a) >= MIN_LATENT_SQNR_DB, sqnr_db(fp_a, q_a)
    # The control image reaches the UNet (33 dB between the two images; untouched zero convolutions: identical).
    assert sqnr_db(fp_a, _latents(fp, "controlnet", b, None)) < 45.0


def test_a_video_to_video_class_is_calibrated_on_seeded_clips_and_runs_from_its_bundle(tmp_path: Path) -> None:
    from diffkiln.calibrate import PromptSource, VideoSource
    from tests.matrix.builders import build

    # CogVideoX's video-to-video class on the matrix's tiny CogVideoX: its ``video`` defaults to None
    # and comes with a ``strength``; it takes no num_frames (the clip's length is its own).
    pipe = diffusers.CogVideoXVideoToVideoPipeline.from_pretrained(build("cogvideox", tmp_path / "t2v"))
    pipe.save_pretrained(tmp_path / "folder")
    call = {"height": 32, "width": 32, **T5}
    config = OptimizeConfig(out=tmp_path / "bundle", calib_size=2, steps=2, progress=False,
                            call_kwargs=tuple(call.items()))  # fmt: skip
    manifest = json.loads((optimize(str(tmp_path / "folder"), config) / "manifest.json").read_text())
    recorded = manifest["plan"]["notes"]["calibration"]["source"]["images"]
    assert recorded == {"kind": "video", "count": 2, "seed": 0, "height": 32, "width": 32, "frames": 9}, recorded
    fp, q = load_pipeline(str(tmp_path / "folder")), load_pipeline(str(tmp_path / "bundle"))
    assert type(q).__name__ == "CogVideoXVideoToVideoPipeline"
    gen = GenerateConfig(steps=3, progress=False, call_kwargs=tuple(call.items()))

    def final(pipe: Any, clip_seed: int) -> torch.Tensor:
        clips = VideoSource(1, clip_seed, 32, 32)
        source = PromptSource(("a red circle",), clips)
        return generate(pipe, [], gen, measure=True, source=source).extras["latents"].float()

    fp_a, q_a = final(fp, 0), final(q, 0)
    sqnr = sqnr_db(fp_a, q_a)
    other = sqnr_db(fp_a, final(fp, 1))
    print(f"cogvideox video-to-video: bundle against FP {sqnr:.1f} dB, another clip {other:.1f} dB")
    assert sqnr >= MIN_LATENT_SQNR_DB, sqnr
    assert other < sqnr  # another clip moves the result more than quantization does (33 against 9 dB)

    # The user's own clip (an animated GIF), to calibrate on and to generate from, on the command line.
    from diffkiln.cli import main

    frames = VideoSource(1, 7, 32, 32).sample(0)["video"]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    sizes = [a for k, v in call.items() for a in ("--call-arg", f"{k}={v}")]
    args = ["optimize", str(tmp_path / "folder"), "--calib-size", "2", "--steps", "2", "--calib-video", str(gif)]
    assert main([*args, *sizes, "--no-progress", "--out", str(tmp_path / "own")]) == 0
    recorded = json.loads((tmp_path / "own" / "manifest.json").read_text())["plan"]["notes"]["calibration"]
    assert recorded["source"]["images"]["kind"] == "video_files" and recorded["inputs"] == {"videos": [str(gif)]}
    args = ["generate", str(tmp_path / "own"), "--prompt", "a red circle", "--video", str(gif), "--steps", "2"]
    assert main([*args, *sizes, "--no-progress", "--out", str(tmp_path / "gen")]) == 0
    assert sorted(p.suffix for p in (tmp_path / "gen").iterdir()) == [".gif", ".png"]


def test_the_report_shows_what_each_sample_started_from(built: dict[str, Path], tmp_path: Path) -> None:
    from diffkiln.cli import main
    from diffkiln.outputs import input_picture

    bundle = built["sd15-inpaint-9ch"] / "bundle"
    args = ["report", str(bundle), "--eval-size", "2", "--steps", "2", "--no-bos-comparison", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert page.count("<h2>Inputs (the region an inpainting mask repaints in red)</h2>") == 1
    # The picture: the image, tinted red where the mask repaints and untouched elsewhere.
    a, _, mask = _images(tmp_path)
    picture = np.asarray(input_picture({"image": Image.open(a), "mask_image": Image.open(mask)})).astype(int)
    original = np.asarray(Image.open(a).convert("RGB")).astype(int)
    assert np.array_equal(picture[:, :16], original[:, :16])
    assert np.array_equal(picture[:, 16:], np.round((original[:, 16:] + [230, 30, 30]) / 2).astype(int))
    assert input_picture({"prompt": "x"}) is None
