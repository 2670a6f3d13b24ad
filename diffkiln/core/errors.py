"""Typed errors. Every user-facing failure is one of these, with a message naming the fix.

The CLI prints ``error: <message>`` for them and exits with status 2, never a traceback.
"""

from __future__ import annotations

__all__ = ["BundleError", "DiffkilnError", "InvalidInputError", "ModelNotFoundError", "NonFiniteError"]


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
