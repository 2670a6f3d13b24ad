"""Built-in models: the trained shapes-world pipelines and their content judge."""

from diffkiln.zoo.registry import (
    BUILTIN_MODELS,
    BuiltinModel,
    JudgeKind,
    ResolvedTarget,
    get_builtin,
    resolve_target,
)

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "JudgeKind", "ResolvedTarget", "get_builtin", "resolve_target"]
