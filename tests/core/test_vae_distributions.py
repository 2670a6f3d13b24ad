"""The latent distributions the ONNX loader rebuilds: each diffusers class from its parameters, bit
for bit, and no class outside the list."""

from __future__ import annotations

import pytest
import torch

from diffkiln.core.vae_distributions import DISTRIBUTIONS, distribution_name, rebuild_distribution


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_each_class_is_rebuilt_from_its_parameters(name: str) -> None:
    import importlib

    cls = getattr(importlib.import_module(DISTRIBUTIONS[name]), name)
    original = cls(torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(0)))
    assert distribution_name(original) == name
    rebuilt = rebuild_distribution(name, original.parameters)
    assert type(rebuilt) is cls
    for field in ("mean", "std", "var", "logvar"):
        assert torch.equal(getattr(rebuilt, field), getattr(original, field)), field


def test_other_values_and_names_are_refused() -> None:
    assert distribution_name(torch.zeros(2)) is None and distribution_name("DiagonalGaussianDistribution") is None
    with pytest.raises(KeyError):
        rebuild_distribution("os.system", torch.zeros(2, 2))
