"""The options of the mixed recipe and of cache schedules, shared by ``optimize``, ``sensitivity``
and sweeps (their config fields are mapped in :data:`diffkiln.cli_args.RECIPE_OPTIONS`)."""

from __future__ import annotations

import argparse

from diffkiln.cli_values import bounded, float_list, int_list, positive_int

__all__ = ["add_cache_args", "add_mixed_args"]


def add_mixed_args(p: argparse.ArgumentParser) -> None:
    """The mixed recipe's options (``optimize --recipe mixed`` and ``sensitivity``)."""
    p.add_argument("--avg-weight-bits", type=float, metavar="BITS",
                   help="mixed: the average weight bits over all quantizable parameters, FP layers counting 16 "
                   "(default 4)")  # fmt: skip
    p.add_argument(
        "--avg-act-bits",
        type=float,
        metavar="BITS",
        help="mixed: the average activation bits (default: 8-bit activations on every quantized layer)",
    )
    p.add_argument(
        "--weight-candidates",
        type=int_list,
        metavar="LIST",
        help="mixed: weight bit-widths to choose from, among 2,3,4,8,16 (16 = FP; default 2,4,8,16)",
    )
    p.add_argument(
        "--act-candidates",
        type=int_list,
        metavar="LIST",
        help="mixed: activation bit-widths with --avg-act-bits, 16 = weight-only (default 8,16)",
    )
    p.add_argument("--weight-group-size", type=positive_int, metavar="G",
                   help="mixed: store 4-, 3- and 2-bit weights in two-level groups of G inputs (a power of two, "
                   "e.g. 64; default: per channel)")  # fmt: skip
    p.add_argument("--weight-budget", choices=["stored", "codes"],
                   help="mixed: what --avg-weight-bits averages: stored bits per weight, scales included (default), "
                   "or code bits only (MixDQ's count)")  # fmt: skip
    p.add_argument(
        "--content-layers",
        action="append",
        metavar="GLOB",
        help="mixed: force layers into the content group (scored by final outputs; repeatable)",
    )
    p.add_argument(
        "--quality-layers",
        action="append",
        metavar="GLOB",
        help="mixed: force layers into the quality group (scored by denoiser-output SQNR; repeatable)",
    )
    p.add_argument("--sensitivity-prompts", type=positive_int, help="mixed: samples each sensitivity trial runs (4)")
    p.add_argument("--select-prompts", type=positive_int, help="mixed: samples per candidate plan (32)")
    p.add_argument("--workers", type=positive_int, help="mixed: processes for the sensitivity trials (default 1)")
    p.add_argument("--latency-budget", type=bounded(float, 0.0, True, "a positive number of milliseconds"),
                   metavar="MS", help="mixed: bound the summed per-call latency of the searched layers, from a "
                   "table measured per layer on this machine's CPU")  # fmt: skip


def add_cache_args(o: argparse.ArgumentParser) -> None:
    """The cache-schedule options: the cache recipe's own, or composed with w8a8 / mixed."""
    o.add_argument("--cache-budget", type=float, metavar="FRACTION",
                   help="search a cache schedule (which steps reuse the last computed step's blocks) that runs this "
                   "fraction of the denoiser's block evaluations, e.g. 0.5; with --recipe cache alone (float weights) "
                   "or composed with w8a8 / mixed")  # fmt: skip
    o.add_argument(
        "--cache-speedup",
        type=float,
        metavar="X",
        help="the same as --cache-budget 1/X (2: half the block evaluations)",
    )
    o.add_argument(
        "--cache-mechanisms",
        type=lambda v: tuple(v.split(",")),
        metavar="LIST",
        help="mechanisms to search among: whole (reuse the denoiser output), residual (skip a range of a "
        "block list, add back its residual), deep (reuse the deep blocks' outputs); default all",
    )
    o.add_argument("--cache-periodic", action="store_const", const=True,
                   help="only schedules that compute every step before a start step, then every k-th one (the form "
                   "MindIE-SD's CacheConfig takes; implied by --target mindiesd)")  # fmt: skip
    o.add_argument("--cache-retain", type=float, metavar="FRACTION",
                   help="always compute this fraction of the first steps (MagCache's retention ratio, e.g. 0.2); "
                   "default 0: the search proposes schedules with and without and keeps the best measured")  # fmt: skip
    o.add_argument("--cache-refine", type=int, metavar="N",
                   help="after validation, try up to N single-step moves of the best schedule's computing steps, "
                   "kept when the measured latent score improves; default 0 (the score sees a few calibration "
                   "samples, and the moves can trade judged content for it)")  # fmt: skip
    o.add_argument("--sweep-cache", type=float_list, metavar="LIST",
                   help="build one bundle per cache budget (e.g. 0.35,0.5,0.7) under --out, evaluate them against FP "
                   "and write sweep.json and sweep.html (the Pareto front); with --attn-density, each bundle's "
                   "masks searched under its own schedule")  # fmt: skip
