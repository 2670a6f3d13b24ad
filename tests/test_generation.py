from __future__ import annotations

from pathlib import Path

import pytest

from diffkiln.core.errors import InvalidInputError
from diffkiln.generation import GenerateConfig, generate, read_prompts
from diffkiln.report import ReportConfig
from diffkiln.zoo.registry import resolve_target


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer"),
        ({"steps": -2}, "steps must be a positive integer"),
        ({"guidance": -1.0}, "guidance must be >= 0"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_generate_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        GenerateConfig(**kwargs)


def test_report_config_rejects_bad_values() -> None:
    with pytest.raises(InvalidInputError, match="eval_size"):
        ReportConfig(eval_size=0)
    with pytest.raises(InvalidInputError, match="steps"):
        ReportConfig(steps=0)


def test_defaults_come_from_the_builtin_model() -> None:
    target = resolve_target("shapes-unet")
    assert GenerateConfig().resolved(target) == (20, 5.0)
    assert GenerateConfig(steps=7, guidance=0.0).resolved(target) == (7, 0.0)


def test_read_prompts(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# header\n a red circle on the left \n\n# x\na blue square at the top\n")
    assert read_prompts(f) == ["a red circle on the left", "a blue square at the top"]
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n# nothing\n")
    with pytest.raises(InvalidInputError, match="holds no prompt"):
        read_prompts(tmp_path / "e.txt")


def test_generate_rejects_empty_prompts(shapes_pipelines) -> None:
    pipe = shapes_pipelines["shapes-unet"]
    with pytest.raises(InvalidInputError, match="no prompts"):
        generate(pipe, [], GenerateConfig(progress=False))
    with pytest.raises(InvalidInputError, match="empty"):
        generate(pipe, ["a red circle on the left", "  "], GenerateConfig(progress=False))
