"""Which parametrized cases run in CI and which only in ``make test-slow``.

CI's suite has to stay near ten minutes on two cores. Where one case per mechanism already runs
in CI, the other cases of the same test (each a half-minute or more: an ONNX export is mostly
torch.export's tracing) move to the slow tier rather than out of the suite.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def tiered(values: Iterable[Any], slow: Iterable[Any]) -> list[Any]:
    """``values`` as parametrize cases, those in ``slow`` marked ``slow`` (``make test-slow``); a
    tuple is one case of several argument names."""
    slow = list(slow)
    values = list(values)
    unknown = [v for v in slow if v not in values]
    assert not unknown, f"slow cases that are not cases: {unknown}"
    def case(v: Any) -> Any:
        return pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)

    return [case(v) if v in slow else v for v in values]
