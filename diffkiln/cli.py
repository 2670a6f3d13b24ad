"""The ``diffkiln`` command line. Thin: it parses arguments (:mod:`diffkiln.cli_args`), calls the
public API and prints what the API returns.

Errors print one ``error: ...`` line that names the problem and the fix, without a traceback:
status 2 for a usage error (unknown model, missing folder, empty prompt list, bad numbers, an
option that does not apply, an output path that may not be written), status 1 for a failure (a
bundle or export that fails its checks, a model that produces non-finite values, a file the
system cannot read or write). docs/cli-errors.md lists every refused input with its message.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffkiln.cli_args import FORMAT_OPTIONS, RECIPE_OPTIONS, build_parser, parse_call_args
from diffkiln.core.atomic import check_results_folder
from diffkiln.core.errors import DiffkilnError, InvalidInputError, exit_status

__all__ = ["main"]


def _call_kwargs(a: argparse.Namespace) -> tuple[tuple[str, Any], ...]:
    try:
        return parse_call_args(a.call_arg, a.call_args)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def _options(a: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    """The options the user gave, by config field (lists become tuples)."""
    out: dict[str, Any] = {}
    for dest, field_name in mapping.items():
        value = getattr(a, dest, None)
        if value is not None:
            out[field_name] = tuple(value) if isinstance(value, list) else value
    return out


_CACHE_FLAGS = {
    "budget": "--cache-budget",
    "mechanisms": "--cache-mechanisms",
    "periodic": "--cache-periodic",
    "retain": "--cache-retain",
    "refine": "--cache-refine",
}
_SPARSE_FLAGS = {"density": "--attn-density", "block": "--attn-block"}


def _flags(mapping: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Config field -> the option a user types for it (``group_size`` -> ``--weight-group-size``)."""
    flags = {field_name: "--" + dest.replace("_", "-") for dest, field_name in mapping.items()}
    return {**flags, **(extra or {})}


def _cmd_models() -> int:
    from diffkiln.zoo.registry import BUILTIN_MODELS

    for m in BUILTIN_MODELS.values():
        defaults = f"steps={m.default_steps} guidance={m.default_guidance}"
        print(f"{m.name:<12} {m.pipeline_class:<26} {defaults}  {m.description}")
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from diffkiln.api import InputFiles
    from diffkiln.generation import GenerateConfig, generate, load_pipeline, read_prompts, save_outputs
    from diffkiln.zoo.registry import resolve_target

    prompts = list(a.prompt) + (read_prompts(a.prompts) if a.prompts else [])
    config = GenerateConfig(a.steps, a.guidance, a.seed, a.batch_size, not a.no_progress, _call_kwargs(a), a.denoiser,
                            vae_tiling=a.vae_tiling)  # fmt: skip
    target = resolve_target(a.target)
    pipe = load_pipeline(target, a.device)
    inputs = InputFiles.of(a.image, a.mask_image, a.control_image, a.video)
    result = generate(pipe, prompts, config, target, samples=a.samples, inputs=inputs)
    paths = save_outputs(result, a.out)
    for p in paths:
        print(p)
    settings = f"steps={result.steps}, guidance={result.guidance}, seed={result.seed}"
    print(f"wrote {len(paths)} file(s) to {a.out} ({settings})")
    return 0


def _report_out(a: argparse.Namespace) -> Path:
    return Path(a.out) if a.out else Path("out") / f"report-{Path(a.target).name}"


def _check_early(a: argparse.Namespace) -> None:
    """What is wrong with the arguments alone, answered before the slow imports and any model
    load: a device this machine lacks, a TARGET that is no built-in name and no folder, a
    diffusers folder with a component or weights file missing, a results folder that is a file."""
    from diffkiln.core.devices import resolve_device
    from diffkiln.core.pipeline_folder import check_pipeline_folder
    from diffkiln.zoo.registry import resolve_target

    if getattr(a, "device", None):
        resolve_device(a.device)
    if getattr(a, "target", None) is not None:
        target = resolve_target(a.target, build=False)
        if target.builtin is None and not target.bundle:  # a user's diffusers folder: checked as its load will
            check_pipeline_folder(target.path)
    if a.command in ("generate", "report"):
        check_results_folder(Path(a.out) if a.command == "generate" else _report_out(a))


def _cmd_report(a: argparse.Namespace) -> int:
    from diffkiln.report import ReportConfig, report
    from diffkiln.report.compare import format_quality, read_report, regressions
    from diffkiln.zoo.registry import JudgeKind

    config = ReportConfig(
        eval_size=a.eval_size,
        eval_prompts=a.eval_prompts,
        steps=a.steps,
        guidance=a.guidance,
        seed=a.seed,
        judge=None if a.judge == "auto" else JudgeKind(a.judge),
        batch_size=a.batch_size,
        device=a.device,
        progress=not a.no_progress,
        baseline=a.baseline,
        force_baseline=a.force_baseline,
        bos_comparison=not a.no_bos_comparison,
        call_kwargs=_call_kwargs(a),
        vae_tiling=a.vae_tiling,
    )
    old_report = read_report(a.fail_on_regression) if a.fail_on_regression else None
    json_path, html_path = report(a.target, config, _report_out(a))
    data = json.loads(json_path.read_text())
    print(f"evaluated on {data['settings']['prompts_source']}")
    line = format_quality(data)
    if line:
        print(line)
    print(f"wrote {json_path} and {html_path}")
    if old_report is None:
        return 0
    problems = regressions(data, old_report, a.tolerance, a.sqnr_tolerance)
    for p in problems:
        print(f"regression: {p}", file=sys.stderr)
    if problems:
        return 3
    print(f"no regression against {a.fail_on_regression}")
    return 0


def _cache_options(a: argparse.Namespace) -> dict[str, Any]:
    """The cache options given, by CacheConfig field (``--cache-speedup X`` is a budget of 1/X)."""
    out: dict[str, Any] = {}
    if getattr(a, "cache_budget", None) is not None and getattr(a, "cache_speedup", None) is not None:
        raise InvalidInputError("give --cache-budget or --cache-speedup, not both")
    if getattr(a, "cache_budget", None) is not None:
        out["budget"] = a.cache_budget
    if getattr(a, "cache_speedup", None) is not None:
        if a.cache_speedup < 1.0:
            raise InvalidInputError(f"--cache-speedup must be >= 1, got {a.cache_speedup}")
        out["budget"] = 1.0 / a.cache_speedup
    if getattr(a, "cache_mechanisms", None) is not None:
        out["mechanisms"] = a.cache_mechanisms
    if getattr(a, "cache_periodic", None):
        out["periodic"] = True
    if getattr(a, "cache_retain", None) is not None:
        out["retain"] = a.cache_retain
    if getattr(a, "cache_refine", None) is not None:
        out["refine"] = a.cache_refine
    return out


def _optimize_config(a: argparse.Namespace, recipe: Any, out: Path, cache: Any = None, sparse: Any = None) -> Any:
    from diffkiln.api import FloatStorage, InputFiles, OptimizeConfig

    return OptimizeConfig(
        out=out,
        recipe=recipe,
        cache=cache,
        sparse=sparse,
        calib_prompts=a.calib_prompts,
        calib_size=a.calib_size,
        calib_inputs=InputFiles.of(a.calib_image, a.calib_mask_image, a.calib_control_image, a.calib_video),
        steps=a.steps,
        guidance=a.guidance,
        call_kwargs=_call_kwargs(a),
        denoiser=a.denoiser,
        deploy_target=getattr(a, "deploy_target", None),
        float_storage=FloatStorage(a.float_storage) if getattr(a, "float_storage", None) else None,
        overwrite=getattr(a, "overwrite", False),
        cache_dir=a.cache_dir,
        seed=a.seed,
        progress=not a.no_progress,
    )


def _cmd_optimize(a: argparse.Namespace) -> int:
    from diffkiln.api import (
        CacheConfig,
        SparseConfig,
        SweepConfig,
        build_cache_sweep,
        build_sparse_sweep,
        build_sweep,
        optimize,
    )
    from diffkiln.optimizer import recipe_config_from_options

    cache_options = _cache_options(a)
    sparse_options = {"density": a.attn_density} if getattr(a, "attn_density", None) is not None else {}
    if getattr(a, "attn_block", None) is not None:
        sparse_options["block"] = a.attn_block
    if a.recipe == "cache":
        recipe = recipe_config_from_options(a.recipe, {**_options(a, RECIPE_OPTIONS), **cache_options},
                                            _flags(RECIPE_OPTIONS, _CACHE_FLAGS))  # fmt: skip
        cache = None
    else:
        recipe = recipe_config_from_options(a.recipe, {**_options(a, RECIPE_OPTIONS),
                                                       **(sparse_options if a.recipe == "sparse" else {})},
                                            _flags(RECIPE_OPTIONS, _SPARSE_FLAGS))  # fmt: skip
        cache = CacheConfig(**cache_options) if cache_options else None
    sparse = SparseConfig(**sparse_options) if sparse_options and a.recipe != "sparse" else None
    config = _optimize_config(a, recipe, a.out, cache, sparse)
    if a.sweep_cache or getattr(a, "sweep_attn", None):
        from diffkiln.report.sweep import evaluate_sweep, format_sweep_rows

        if a.sweep_cache and a.sweep_attn:
            raise InvalidInputError("give --sweep-cache or --sweep-attn, not both")
        build = (build_cache_sweep(a.target, config, tuple(a.sweep_cache)) if a.sweep_cache
                 else build_sparse_sweep(a.target, config, tuple(a.sweep_attn)))  # fmt: skip
        json_path, html_path = evaluate_sweep(build, a.sweep_eval_size, not a.no_progress, a.vae_tiling)
        print("\n".join(format_sweep_rows(json.loads(json_path.read_text()))))
        print(f"wrote {json_path} and {html_path}")
        return 0
    if a.sweep:
        from diffkiln.report.sweep import evaluate_sweep, format_sweep_rows

        json_path, html_path = evaluate_sweep(
            build_sweep(a.target, config, SweepConfig(budgets=tuple(a.sweep))), a.sweep_eval_size, not a.no_progress,
            a.vae_tiling,
        )
        print("\n".join(format_sweep_rows(json.loads(json_path.read_text()))))
        print(f"wrote {json_path} and {html_path}")
        return 0
    bundle = optimize(a.target, config)
    print(f"wrote bundle {bundle}")
    return _cmd_inspect(argparse.Namespace(bundle=bundle, json=False))


def _cmd_sensitivity(a: argparse.Namespace) -> int:
    from diffkiln.api import sensitivity
    from diffkiln.optimizer import recipe_config_from_options
    from diffkiln.report.sensitivity_html import format_sensitivity_table, write_sensitivity

    recipe = recipe_config_from_options("mixed", _options(a, RECIPE_OPTIONS), _flags(RECIPE_OPTIONS))
    out = a.out or Path("out") / f"sensitivity-{Path(a.target).name}"
    check_results_folder(out)
    table, seconds, name = sensitivity(a.target, _optimize_config(a, recipe, out))
    json_path, html_path = write_sensitivity(table, out, name, seconds)
    print(format_sensitivity_table(table, a.top))
    print(f"wrote {json_path} and {html_path}")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from diffkiln.api import convert
    from diffkiln.export import format_config_from_options

    out = convert(a.bundle, format_config_from_options(a.format, _options(a, FORMAT_OPTIONS)))
    for path in sorted(out.glob("*")):
        if path.suffix in (".onnx", ".safetensors", ".data"):
            print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _cmd_inspect(a: argparse.Namespace) -> int:
    from diffkiln.core.atomic import diffkiln_output_kind

    if diffkiln_output_kind(Path(a.bundle)) == "diffkiln.onnx":
        from diffkiln.runtime.inspect_onnx import format_onnx_summary, summarize_onnx

        summary = summarize_onnx(a.bundle)
        print(json.dumps(summary, indent=2) if a.json else "\n".join(format_onnx_summary(summary, a.bundle)))
        return 0
    from diffkiln.runtime.inspect import format_summary, summarize

    summary = summarize(a.bundle)
    print(json.dumps(summary, indent=2) if a.json else "\n".join(format_summary(summary, a.bundle)))
    return 0


_COMMANDS = {
    "generate": _cmd_generate,
    "report": _cmd_report,
    "optimize": _cmd_optimize,
    "sensitivity": _cmd_sensitivity,
    "export": _cmd_export,
    "inspect": _cmd_inspect,
}


class _CliFormatter(logging.Formatter):
    """diffkiln's own messages as the CLI's lines: information plain, warnings as ``warning: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (a test's capture replaces it between calls)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _show_messages() -> None:
    """Print diffkiln's log records (a search's resolved budget, a warning) to stderr, once."""
    logger = logging.getLogger("diffkiln")
    if not any(getattr(h, "diffkiln_cli", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_CliFormatter())
        handler.diffkiln_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _quiet_warnings() -> None:
    """Silence the library warnings a CLI user cannot act on. torch's ``var()``/``std()`` degrees
    of freedom warning fires on one-element statistics (a batch of one, one calibration sample),
    where the value returned is the one wanted; diffusers' notes on modules kept in float32 and
    similar load-time messages are set to errors-only (the loaded model is what diffkiln asked for)."""
    warnings.filterwarnings("ignore", message=r"(var|std)(_mean)?\(\): degrees of freedom", category=UserWarning)
    # torch's ONNX exporter: its own deprecation notes, and that torchvision's ops are not registered
    # (diffkiln exports none of them).
    warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()  # per-file loading bars: diffkiln's own bars name the stages
    tlog.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffkiln`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    _show_messages()
    try:
        if args.command != "models":
            from diffkiln.core.threads import set_threads

            _check_early(args)
            _quiet_warnings()
            set_threads(args.threads)
        return _cmd_models() if args.command == "models" else _COMMANDS[args.command](args)
    except DiffkilnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_status(exc)
    except OSError as exc:  # disk full, permission denied, ...: the system's reason is the message
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
