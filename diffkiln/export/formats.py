"""Bundle export formats, registered by their config type: ``convert_bundle(bundle, OnnxExportConfig(...))``.

Each format is a function ``(LoadedBundle, config) -> output folder`` registered for one frozen
config dataclass and a name (the CLI's ``export --format``). A config whose type has no format is
an error that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffkiln.core.atomic import check_output_folder
from diffkiln.core.configs import config_from_options
from diffkiln.core.errors import InvalidInputError
from diffkiln.core.schema import LoadedBundle
from diffkiln.export.mindiesd import MindieExportConfig, export_mindiesd
from diffkiln.export.onnx import OnnxExportConfig

__all__ = ["FormatFn", "convert_bundle", "format_config_from_options", "format_names", "register_format"]

FormatFn = Callable[[LoadedBundle, Any], Path]
"""An export format: (a loaded, verified bundle, the format's config) -> the written folder."""


@dataclass(frozen=True)
class _Entry:
    name: str
    config_type: type
    fn: FormatFn


_BY_TYPE: dict[type, _Entry] = {}
_BY_NAME: dict[str, _Entry] = {}


def register_format(name: str, config_type: type) -> Callable[[FormatFn], FormatFn]:
    """Decorator: register ``fn`` as export format ``name`` for configs of ``config_type``."""

    def deco(fn: FormatFn) -> FormatFn:
        entry = _Entry(name, config_type, fn)
        _BY_TYPE[config_type] = entry
        _BY_NAME[name] = entry
        return fn

    return deco


def format_names() -> list[str]:
    """Every registered export format's name."""
    return sorted(_BY_NAME)


def format_config_from_options(name: str, options: Mapping[str, Any]) -> Any:
    """Format ``name``'s config from options named as its fields (None: not given).

    Raises:
        InvalidInputError: unknown format (the message lists the valid ones), an option the
            format does not take, or a bad value.
    """
    if name not in _BY_NAME:
        raise InvalidInputError(f"unknown export format {name!r}; valid: {', '.join(format_names())}")
    return config_from_options(_BY_NAME[name].config_type, options, f"--format {name}")


def convert_bundle(bundle: LoadedBundle, config: Any) -> Path:
    """Write ``bundle`` in the format ``config`` belongs to.

    Raises:
        InvalidInputError: no format for the config's type; the message lists the valid types.
        BundleError: ``config.out`` may not be written (:func:`~diffkiln.core.atomic.check_output_folder`).
    """
    entry = _BY_TYPE.get(type(config))
    if entry is None:
        valid = ", ".join(sorted(t.__name__ for t in _BY_TYPE))
        raise InvalidInputError(f"no export format for a {type(config).__name__}; valid config types: {valid}")
    check_output_folder(Path(config.out), bool(config.overwrite))  # refused before the export's work
    return entry.fn(bundle, config)


def _export_onnx(bundle: LoadedBundle, config: OnnxExportConfig) -> Path:
    """The ONNX format: :func:`~diffkiln.export.onnx.exporter.export_onnx`, imported when an export
    runs (it brings onnxscript and torch.onnx)."""
    from diffkiln.export.onnx.exporter import export_onnx

    return export_onnx(bundle, config)


register_format("onnx", OnnxExportConfig)(_export_onnx)
register_format("mindiesd", MindieExportConfig)(export_mindiesd)
