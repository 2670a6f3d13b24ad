"""What a pipeline's tokenizers must still be when a bundle is loaded: vocabulary size, longest
input and special-token ids, recorded when the bundle is written and compared when it is read.

A tokenizer's files are listed and checksummed like every bundle file, but a re-signed edit that is
still valid JSON (a pad token renamed, ``model_max_length`` dropped) loads without complaint and
only fails at the first prompt: an unknown pad token becomes a new id past the text encoder's
embedding table (``IndexError``), a missing length pads to 10^30 tokens (``OverflowError``). The
fingerprint turns those into a ``BundleError`` at load. Tokenizers are found by type
(transformers' ``PreTrainedTokenizerBase``), not by component name.
"""

from __future__ import annotations

from typing import Any

from diffkiln.core.errors import BundleError

__all__ = ["check_tokenizer_prints", "tokenizer_prints"]


def _print(tokenizer: Any) -> dict[str, Any]:
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in sorted(tokenizer.special_tokens_map.items())
           if isinstance(token, str)}  # fmt: skip
    length = tokenizer.model_max_length
    return {
        "vocab": len(tokenizer),
        # transformers' stand-in for "no limit" is 10^30; JSON keeps it, an int64 would not
        "model_max_length": int(length) if length < 1 << 62 else None,
        "special_ids": ids,
    }


def tokenizer_prints(components: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fingerprint of each tokenizer among a pipeline's ``components`` (name -> component)."""
    from transformers import PreTrainedTokenizerBase

    return {name: _print(c) for name, c in sorted(components.items()) if isinstance(c, PreTrainedTokenizerBase)}


def check_tokenizer_prints(components: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Compare the loaded tokenizers with the fingerprints a bundle recorded (none recorded: a
    bundle written before they were; nothing to compare).

    Raises:
        BundleError: a recorded tokenizer is missing or differs; the message names it and the field.
    """
    if not expected:
        return
    actual = tokenizer_prints(components)
    for name, want in sorted(expected.items()):
        got = actual.get(name)
        if got is None:
            raise BundleError(f"{source}: the pipeline has no tokenizer {name!r}, which the bundle was built with")
        for key in ("vocab", "model_max_length", "special_ids"):
            if got.get(key) != want.get(key):
                raise BundleError(
                    f"{source}: tokenizer {name!r} has {key} {got.get(key)!r}, the bundle was built with "
                    f"{want.get(key)!r} (its files were edited after the bundle was written)"
                )
