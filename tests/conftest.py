"""Shared fixtures. Everything runs offline: no hub access is ever attempted."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is present (CI never has one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_pipelines() -> dict[str, object]:
    """Both built-in pipelines, loaded once per session (float32, CPU)."""
    from diffkiln.generation import load_pipeline

    return {name: load_pipeline(name) for name in ("shapes-unet", "shapes-dit")}
