"""Which inputs a pipeline gets, from its call signature: images and masks for the classes that
start from an image, at the size the pipeline works at, or the user's own files."""

from __future__ import annotations

import inspect
import itertools
from pathlib import Path

import diffusers
import numpy as np
import pytest
from PIL import Image

from diffkiln.calibrate import (
    FileImageSource,
    FileVideoSource,
    ImageSource,
    InputFiles,
    PromptSource,
    VideoSource,
    image_size,
    source_for,
    source_from_description,
    takes_images,
    takes_video,
)
from diffkiln.core.errors import InvalidInputError
from diffkiln.zoo.registry import resolve_target

# diffusers' own classes: (needs an input image, takes a mask). Their ``image`` defaults to None
# except where it is required (SVD, Wan and CogVideoX image-to-video).
EXPECTED = {
    "StableDiffusionPipeline": (False, False),
    "FluxPipeline": (False, False),
    "StableDiffusionImg2ImgPipeline": (True, False),
    "StableDiffusionXLImg2ImgPipeline": (True, False),
    "StableDiffusion3Img2ImgPipeline": (True, False),
    "FluxImg2ImgPipeline": (True, False),
    "StableDiffusionInpaintPipeline": (True, True),
    "StableDiffusionXLInpaintPipeline": (True, True),
    "FluxFillPipeline": (True, True),
    "StableVideoDiffusionPipeline": (True, False),
    "WanImageToVideoPipeline": (True, False),
    "CogVideoXImageToVideoPipeline": (True, False),
    # An optional reference or control image: given by the user, never made up.
    "FluxKontextPipeline": (False, False),
    "StableDiffusionControlNetPipeline": (False, False),
}


# diffusers' own classes that take a ``video``: whether the call needs an input clip.
EXPECTED_VIDEO = {
    "CogVideoXPipeline": False,
    "WanPipeline": False,
    "CogVideoXVideoToVideoPipeline": True,
    "WanVideoToVideoPipeline": True,
    "VideoToVideoSDPipeline": True,
    "LTXConditionPipeline": True,
}


@pytest.mark.parametrize("cls", sorted(EXPECTED))
def test_the_classes_that_start_from_an_image_are_found_from_their_signature(cls: str) -> None:
    params = dict(inspect.signature(getattr(diffusers, cls).__call__).parameters)
    assert (takes_images(params), "mask_image" in params) == EXPECTED[cls]


@pytest.mark.parametrize("cls", sorted(EXPECTED_VIDEO))
def test_the_classes_that_start_from_a_clip_are_found_from_their_signature(cls: str) -> None:
    assert takes_video(dict(inspect.signature(getattr(diffusers, cls).__call__).parameters)) == EXPECTED_VIDEO[cls]


def test_synthetic_clips_are_seeded_and_move() -> None:
    clips = VideoSource(2, seed=4, height=24, width=32, frames=5)
    frames = [np.asarray(f) for f in clips.sample(1)["video"]]
    assert len(frames) == 5 and frames[0].shape == (24, 32, 3)
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(frames))  # it moves
    assert np.array_equal(frames[2], np.asarray(clips.sample(1)["video"][2]))  # deterministic
    assert source_from_description(clips.describe()) == clips


def test_synthetic_images_come_at_the_size_the_pipeline_works_at() -> None:
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(resolve_target("tiny-sd15").path)
    # No height/width argument: the UNet's sample size times the VAE's scale factor, as diffusers computes it.
    natural = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert image_size(pipe) == (natural, natural) != (64, 64)
    assert image_size(pipe, {"height": 48, "width": 80}) == (48, 80)
    assert image_size(object()) == (64, 64)
    source = source_for(pipe, ["a red circle"], 3, seed=1)
    assert isinstance(source, PromptSource) and isinstance(source.images, ImageSource)
    assert source.sample(2)["image"].size == (natural, natural) and "mask_image" not in source.sample(2)


def test_masks_are_seeded_binary_regions_that_leave_the_images_unchanged() -> None:
    plain, masked = ImageSource(4, seed=3, height=40, width=56), ImageSource(4, seed=3, height=40, width=56, masks=True)
    fractions = []
    for i in range(4):
        a, b = plain.sample(i), masked.sample(i)
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        mask = np.asarray(b["mask_image"])
        assert mask.shape == (40, 56) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask, np.asarray(masked.sample(i)["mask_image"]))  # deterministic
        fractions.append(float((mask == 255).mean()))
    assert all(0.1 <= f <= 0.7 for f in fractions) and len(set(fractions)) == 4, fractions
    # A source without masks describes itself as before (calibration cache keys stay valid).
    assert "masks" not in plain.describe() and masked.describe()["masks"] is True
    again = source_from_description(masked.describe())
    assert again == masked


def _png(path: Path, value: int, mode: str = "RGB") -> Path:
    shape = (24, 24, 3) if mode == "RGB" else (24, 24)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def test_a_users_files_are_checked_cycled_and_recorded_by_content(tmp_path: Path) -> None:
    a, b = _png(tmp_path / "a.png", 10), _png(tmp_path / "b.png", 200)
    mask = _png(tmp_path / "m.png", 255, "L")
    source = FileImageSource(2, (str(a), str(b)), (str(mask),))
    assert [np.asarray(source.sample(i)["image"])[0, 0, 0] for i in range(2)] == [10, 200]
    assert source.sample(1)["mask_image"].mode == "L"
    recorded = source.describe()
    assert source_from_description(recorded, files=True) == source
    # A bundle's record is untrusted: the files it names are outside it, and not opened from it.
    with pytest.raises(InvalidInputError, match="not re-opened"):
        source_from_description({"kind": "prompt", "prompts": ["x"], "images": recorded})
    _png(b, 90)  # the file changed since it was recorded
    with pytest.raises(InvalidInputError, match="changed since"):
        source_from_description(recorded, files=True)
    (tmp_path / "note.txt").write_text("not an image")
    # Fewer files than samples are taken in turn.
    three = FileImageSource(3, (str(a), str(b)), (str(mask),))
    assert [np.asarray(three.sample(i)["image"])[0, 0, 0] for i in range(3)] == [10, 90, 10]
    for images, masks, message in [
        ((str(a),) * 4, (), "4 image files for 3 samples"),
        ((), (), "no input image given"),
        ((str(tmp_path / "gone.png"),), (), "does not exist"),
        ((str(tmp_path / "note.txt"),), (), "not a readable image"),
        ((str(a),), (str(mask),) * 4, "4 mask files for 3 samples"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            FileImageSource(3, images, masks)


def test_files_that_do_not_fit_the_pipeline_are_refused_naming_the_fix(tmp_path: Path) -> None:
    a, mask = _png(tmp_path / "a.png", 10), _png(tmp_path / "m.png", 255, "L")
    folder = resolve_target("tiny-sd15").path
    text = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    inpaint = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder)
    img2img = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder)
    with pytest.raises(InvalidInputError, match=r"StableDiffusionPipeline takes no input image.*--image"):
        source_for(text, ["x"], 1, inputs=InputFiles.of([a]))
    with pytest.raises(InvalidInputError, match=r"repaints under a mask.*--mask-image"):
        source_for(inpaint, ["x"], 1, inputs=InputFiles.of([a]))
    with pytest.raises(InvalidInputError, match="takes no mask"):
        source_for(img2img, ["x"], 1, inputs=InputFiles.of([a], [mask]))
    with pytest.raises(InvalidInputError, match="needs the image it goes with"):
        source_for(inpaint, ["x"], 1, inputs=InputFiles.of(masks=[mask]))
    with pytest.raises(InvalidInputError, match=r"takes no control image; leave out .*--control-image"):
        source_for(inpaint, ["x"], 1, inputs=InputFiles.of([a], [mask], [a]))
    given = source_for(inpaint, ["x", "y"], 2, inputs=InputFiles.of([a], [mask]))
    assert isinstance(given.images, FileImageSource) and set(given.sample(1)) == {"prompt", "image", "mask_image"}


def test_a_users_clips_are_read_from_animated_images_or_frame_folders(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((16, 24, 3), 30 * t, np.uint8)) for t in range(5)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, frame in enumerate(frames[:3]):
        frame.save(folder / f"{t:03d}.png")
    clips = FileVideoSource(3, (str(gif), str(folder)))
    from_gif, from_folder = clips.sample(0)["video"], clips.sample(1)["video"]
    assert len(from_gif) == 5 and len(from_folder) == 3 and clips.sample(2)["video"][4].size == (24, 16)
    assert [int(np.asarray(f)[0, 0, 0]) for f in from_folder] == [0, 30, 60]
    recorded = clips.describe()
    assert source_from_description(recorded, files=True) == clips
    with pytest.raises(InvalidInputError, match="not re-opened"):
        source_from_description(recorded)
    frames[4].save(folder / "003.png")  # a frame added since the clip was recorded
    with pytest.raises(InvalidInputError, match="changed since"):
        source_from_description(recorded, files=True)
    (tmp_path / "empty").mkdir()
    for given, message in [((str(gif),) * 4, "4 clips for 3 samples"), ((str(tmp_path / "empty"),), "holds no frame"),
                           ((str(tmp_path / "gone.gif"),), "does not exist")]:  # fmt: skip
        with pytest.raises(InvalidInputError, match=message):
            FileVideoSource(3, given)
