"""Recipes, registered by their config type: ``make_plan(model, stats, W8A8Config())``.

Each recipe is a function ``(model, stats, config, context) -> Plan`` registered for one frozen
config dataclass and a name (the CLI's ``--recipe``), as torchao registers its quantization
handlers by config type. A config whose type has no recipe is an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffkiln.calibrate.stats import CalibrationStats
from diffkiln.core.cache_schedule import CacheSchedule
from diffkiln.core.configs import config_from_options
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.plan import Plan

__all__ = [
    "RecipeFn",
    "SearchContext",
    "make_plan",
    "recipe_config_from_options",
    "recipe_config_type",
    "recipe_float_storage",
    "recipe_name",
    "recipe_names",
    "register_recipe",
]


@dataclass(frozen=True)
class SearchContext:
    """What a recipe may use besides the model, its statistics and its config.

    Attributes:
        source_id: the model's id (a built-in name, a folder path), recorded in the plan. Default "".
        cache_dir: where searches cache and resume their measurements; None: no cache. Default None.
        progress: show progress bars. Default True.
        reload: builds a fresh copy of the model in another process (a picklable callable, e.g.
            ``functools.partial(load_pipeline, "tiny-sd15")``), for searches that run workers.
            Default None (no workers).
        inputs: a bare module's calibration calls (``diffkiln.calibrate.ModuleInputs``), for
            searches that measure the module's outputs. Default None.
        cache_schedule: the build's cache schedule, searched before the recipe, for searches that
            work under it (the sparse recipe's mask search). Default None (no cache).
    """

    source_id: str = ""
    cache_dir: Path | None = None
    progress: bool = True
    reload: Callable[[], Any] | None = None
    inputs: Any = None
    cache_schedule: CacheSchedule | None = None


RecipeFn = Callable[[Any, CalibrationStats, Any, SearchContext], Plan]
"""A recipe: (model or pipeline, its statistics, the recipe's config, context) -> Plan."""


@dataclass(frozen=True)
class _Entry:
    name: str
    config_type: type
    fn: RecipeFn
    float_storage: str


_BY_TYPE: dict[type, _Entry] = {}
_BY_NAME: dict[str, _Entry] = {}


def register_recipe(name: str, config_type: type, float_storage: str = "lossless") -> Callable[[RecipeFn], RecipeFn]:
    """Decorator: register ``fn`` as the recipe for configs of ``config_type``, named ``name``.

    Args:
        name: the recipe's name (the CLI's ``--recipe``).
        config_type: its frozen config dataclass.
        float_storage: how its bundles store float tensors by default: "lossless" or "float16"
            (plans measured against an FP16 checkpoint store them as one would).
    """

    def deco(fn: RecipeFn) -> RecipeFn:
        entry = _Entry(name, config_type, fn, float_storage)
        _BY_TYPE[config_type] = entry
        _BY_NAME[name] = entry
        return fn

    return deco


def recipe_names() -> list[str]:
    """Every registered recipe's name."""
    return sorted(_BY_NAME)


def _entry_for_name(name: str) -> _Entry:
    if name not in _BY_NAME:
        raise InvalidInputError(f"unknown recipe {name!r}; valid: {', '.join(recipe_names())}")
    return _BY_NAME[name]


def recipe_config_type(name: str) -> type:
    """The config dataclass of recipe ``name``.

    Raises:
        InvalidInputError: unknown name; the message lists the valid ones.
    """
    return _entry_for_name(name).config_type


def recipe_name(config: Any) -> str:
    """The name of the recipe ``config`` belongs to.

    Raises:
        InvalidInputError: no recipe is registered for its type; the message lists the valid types.
    """
    entry = _BY_TYPE.get(type(config))
    if entry is None:
        valid = ", ".join(sorted(t.__name__ for t in _BY_TYPE))
        raise InvalidInputError(f"no recipe for a {type(config).__name__}; valid config types: {valid}")
    return entry.name


def recipe_float_storage(config: Any) -> str:
    """The default float storage of the recipe ``config`` belongs to ("lossless" or "float16")."""
    recipe_name(config)
    return _BY_TYPE[type(config)].float_storage


def recipe_config_from_options(name: str, options: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> Any:
    """Recipe ``name``'s config from user options named as its fields (None: not given);
    ``flags`` names the option a user types for each field, for messages.

    Raises:
        InvalidInputError: unknown recipe, an option the recipe does not take, or a bad value.
    """
    return config_from_options(_entry_for_name(name).config_type, options, f"--recipe {name}", flags)


def make_plan(model: Any, stats: CalibrationStats, config: Any, context: SearchContext | None = None) -> Plan:
    """Plan the quantization of ``model``'s denoiser with the recipe ``config`` belongs to.

    Args:
        model: the FP pipeline or bare module the statistics were measured on (left unchanged).
        stats: its calibration statistics.
        config: a registered recipe config (:class:`~diffkiln.optimizer.w8a8.W8A8Config`,
            :class:`~diffkiln.optimizer.mixed.MixedConfig`, ...).
        context: source id, cache, progress, worker loader. Default: an empty context.

    Raises:
        InvalidInputError: no recipe for the config's type.
    """
    recipe_name(config)
    return _BY_TYPE[type(config)].fn(model, stats, config, context or SearchContext())
