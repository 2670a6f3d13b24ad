"""Typed errors. Every user-facing failure is one of these, with a message naming the fix.

The CLI prints ``error: <message>`` for them, never a traceback, and exits with :func:`exit_status`:
2 for a usage error (the user gave a wrong argument or path), 1 for a failure.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "DiffkilnError",
    "InvalidInputError",
    "ModelNotFoundError",
    "NonFiniteError",
    "OutputPathError",
    "PipelineCallError",
    "exit_status",
]


class DiffkilnError(Exception):
    """Base class of diffkiln's errors."""


class InvalidInputError(DiffkilnError, ValueError):
    """An argument or input file is invalid (empty prompt list, non-positive steps, ...)."""


class ModelNotFoundError(DiffkilnError, LookupError):
    """A target is neither a built-in model name nor a diffusers folder."""


class BundleError(DiffkilnError):
    """A bundle cannot be used: missing, corrupt, truncated, tampered, or of a future version."""


class NonFiniteError(InvalidInputError):
    """A model produced NaN or infinite values (its weights overflow float32, or its inputs do):
    raised where it is first seen, naming the layer and the step."""


class OutputPathError(BundleError, InvalidInputError):
    """A path given as a bundle or an output cannot be used as one: not a bundle directory, or an
    output that exists (without ``--overwrite``, or holding files diffkiln did not write). A usage
    error, and a :class:`BundleError` for code that catches those."""


class PipelineCallError(DiffkilnError, RuntimeError):
    """The pipeline's own code failed during a call diffkiln made (diffkiln's hooks and kernels
    raise their own errors): names the component that raised, its error, and the fix where one is
    known. A failure (exit status 1): the model's code, not an argument diffkiln could check."""


def exit_status(exc: DiffkilnError) -> int:
    """The CLI's exit status for ``exc``: 2 for a usage error (an invalid argument, a path that
    does not resolve or may not be written), 1 for a failure (a bundle that fails its checks,
    non-finite values)."""
    if isinstance(exc, NonFiniteError):
        return 1
    return 2 if isinstance(exc, (InvalidInputError, ModelNotFoundError)) else 1
