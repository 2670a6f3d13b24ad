"""The built-in "shapes" world: a seeded captioned-image dataset and its content judge."""

from diffkiln.zoo.shapes.dataset import (
    ObjectSpec,
    PairScene,
    PromptSet,
    Scene,
    SingleScene,
    Split,
    all_pair_scenes,
    all_single_scenes,
    eval_scenes,
    parse_prompt,
    render,
    sample_training_scene,
)
from diffkiln.zoo.shapes.judge import Verdict, content_accuracy, detect, judge

__all__ = [
    "ObjectSpec",
    "PairScene",
    "PromptSet",
    "Scene",
    "SingleScene",
    "Split",
    "Verdict",
    "all_pair_scenes",
    "all_single_scenes",
    "content_accuracy",
    "detect",
    "eval_scenes",
    "judge",
    "parse_prompt",
    "render",
    "sample_training_scene",
]
