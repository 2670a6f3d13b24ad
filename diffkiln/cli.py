"""The ``diffkiln`` command line. Thin: it parses arguments and calls the Python API.

Errors that are the user's to fix (unknown model, missing folder, empty prompt list, bad
numbers) print one ``error: ...`` line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from diffkiln import __version__
from diffkiln.errors import DiffkilnError, InvalidInputError

__all__ = ["main"]

_EPILOG = """examples:
  diffkiln models
  diffkiln generate shapes-unet --prompt "a red circle on the left" --out out/gen
  diffkiln report shapes-dit --eval-size 200 --out out/report-dit
"""


def _bounded(cast: Callable[[str], Any], lower: float, strict: bool, what: str) -> Callable[[str], Any]:
    """An argparse type: ``cast`` the text and require it above (``strict``) or at least ``lower``."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < lower or (strict and value == lower):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive_int = _bounded(int, 0, True, "a positive integer")
_non_negative_int = _bounded(int, 0, False, "a non-negative integer")
_non_negative_float = _bounded(float, 0.0, False, "a number >= 0")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=_positive_int, help="denoising steps (default: the model's, 20 for built-ins)")
    p.add_argument(
        "--guidance",
        type=_non_negative_float,
        help="classifier-free guidance scale (default: the model's, 5.0)",
    )
    p.add_argument("--seed", type=_non_negative_int, default=0, help="base seed; image i uses seed+i (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=50, help="prompts per pipeline call (default 50)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffkiln",
        description="diffkiln: an offline compiler for diffusion models. TARGET is a built-in model "
        "name (see `diffkiln models`) or a local diffusers pipeline folder.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"diffkiln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("models", help="list the built-in models, one per line")

    g = sub.add_parser(
        "generate",
        help="generate images from prompts",
        description="Generate one PNG per prompt. Deterministic for a seed: image i uses seed+i.",
    )
    g.add_argument("target", metavar="TARGET", help="built-in model name or diffusers folder")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--prompts", type=Path, metavar="FILE", help="file with one prompt per line ('#' comments)")
    g.add_argument("--out", type=Path, default=Path("out/generate"), help="output folder (default out/generate)")
    _add_sampling_args(g)

    r = sub.add_parser(
        "report",
        help="evaluate a model: content accuracy, images, report.json and report.html",
        description="Generate evaluation images, judge them, and write DIR/report.json and a "
        "self-contained DIR/report.html. Built-in shapes models are scored on three sets: "
        "single objects in seen compositions, in held-out compositions, and two-object scenes.",
    )
    r.add_argument("target", metavar="TARGET", help="built-in model name or diffusers folder")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--eval-size", type=_positive_int, default=200, help="prompts per set (default 200)")
    src.add_argument("--eval-prompts", type=Path, metavar="FILE", help="evaluate these prompts instead")
    r.add_argument(
        "--judge",
        choices=["auto", "shapes", "none"],
        default="auto",
        help="content judge: auto uses the built-in model's own; 'shapes' for a copy of a shapes model",
    )
    r.add_argument("--out", type=Path, default=None, help="output folder (default out/report-<target>)")
    _add_sampling_args(r)
    return parser


def _cmd_models() -> int:
    from diffkiln.zoo.registry import BUILTIN_MODELS

    for m in BUILTIN_MODELS.values():
        print(
            f"{m.name:<12} {m.pipeline_class:<26} steps={m.default_steps} guidance={m.default_guidance}  "
            f"{m.description}"
        )
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from diffkiln.generation import GenerateConfig, generate, load_pipeline, read_prompts, save_images
    from diffkiln.zoo.registry import resolve_target

    prompts = list(a.prompt) + (read_prompts(a.prompts) if a.prompts else [])
    if not prompts:
        raise InvalidInputError("no prompts given; pass --prompt TEXT (repeatable) or --prompts FILE")
    config = GenerateConfig(a.steps, a.guidance, a.seed, a.batch_size, not a.no_progress)
    target = resolve_target(a.target)
    pipe = load_pipeline(target, a.device)
    result = generate(pipe, prompts, config, target)
    paths = save_images(result, a.out)
    for p in paths:
        print(p)
    print(
        f"wrote {len(paths)} image(s) to {a.out} (steps={result.steps}, guidance={result.guidance}, seed={result.seed})"
    )
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from diffkiln.report import ReportConfig, report
    from diffkiln.zoo.registry import JudgeKind

    judge = None if a.judge == "auto" else JudgeKind(a.judge)
    config = ReportConfig(
        eval_size=a.eval_size,
        eval_prompts=a.eval_prompts,
        steps=a.steps,
        guidance=a.guidance,
        seed=a.seed,
        judge=judge,
        batch_size=a.batch_size,
        device=a.device,
        progress=not a.no_progress,
    )
    if a.eval_prompts is not None:
        from diffkiln.generation import read_prompts

        read_prompts(a.eval_prompts)  # fail on a bad file before loading the model
    out = a.out or Path("out") / f"report-{Path(a.target).name}"
    json_path, html_path = report(a.target, config, out)
    import json

    q = json.loads(json_path.read_text()).get("quality")
    if q:
        print(
            f"content_accuracy={_fmt(q['content_accuracy'])} heldout={_fmt(q['content_accuracy_heldout'])} "
            f"pairs={_fmt(q['content_accuracy_pairs'])} (n={q['n_prompts']})"
        )
    print(f"wrote {json_path} and {html_path}")
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffkiln`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "models":
            return _cmd_models()
        if args.command == "generate":
            return _cmd_generate(args)
        return _cmd_report(args)
    except DiffkilnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
