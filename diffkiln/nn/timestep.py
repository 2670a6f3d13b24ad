"""Which calibrated step the denoiser is at, for layers with timestep-aware activation ranges.

A forward pre-hook on the denoiser reads the timestep of each call (the ``timestep`` keyword, or
the second positional argument as in ``unet(sample, t, ...)``) and selects the nearest calibrated
timestep; the quantized layers then quantize on that step's grid. The hook is registered under
one name on the denoiser and replaced, never stacked, when layers are swapped in again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["StepSelector", "install_step_selector"]

_HOOK_ATTR = "_diffkiln_step_selector_hook"


class StepSelector:
    """Holds the calibrated timesteps and the index of the one nearest the current call's.

    For a timestep tensor the index is also kept as a 0-d int64 tensor on its device
    (:attr:`index_tensor`), computed there: kernels that read it from device memory (the CUDA
    backend's Triton kernels) select their step's grid with no host sync, and a compiled denoiser
    keeps one graph. The Python :attr:`index`, which the other kernels need, is read from that
    tensor only when asked for (on a GPU, one sync per call).
    """

    def __init__(self, timesteps: torch.Tensor) -> None:
        if timesteps.dim() != 1 or timesteps.numel() == 0:
            raise ValueError("a step selector needs a non-empty 1-D tensor of calibrated timesteps")
        self.timesteps = timesteps.detach().to(torch.float32).cpu()
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self._index: int | None = 0
        self.index_tensor: torch.Tensor | None = None

    @property
    def index(self) -> int:
        """The index of the calibrated timestep nearest the current call's."""
        if self._index is None:
            assert self.index_tensor is not None
            self._index = int(self.index_tensor)
        return self._index

    def select(self, timestep: Any) -> int:
        """Set and return the index of the calibrated timestep nearest ``timestep``."""
        self._select(timestep)
        return self.index

    def _select(self, timestep: Any) -> None:
        if not isinstance(timestep, torch.Tensor):
            self.index_tensor, self._index = None, int(torch.argmin((self.timesteps - float(timestep)).abs()))
            return
        device = timestep.device
        table = self._on_device.get(device)
        if table is None:
            table = self._on_device.setdefault(device, self.timesteps.to(device))
        # The call's noise level is its largest timestep: a per-token timestep (Wan 2.2 TI2V's
        # expand_timesteps) holds 0 for the clean conditioning frame's tokens, which come first.
        self.index_tensor = torch.argmin((table - timestep.amax().to(torch.float32)).abs())
        self._index = None  # read from index_tensor when a kernel needs it on the host

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is not None:
            self._select(timestep)


def install_step_selector(denoiser: nn.Module) -> StepSelector | None:
    """Give every timestep-aware quantized layer of ``denoiser`` one shared selector, fed by a hook.

    Returns:
        The selector, or None when no layer is timestep-aware (then no hook is registered).

    Raises:
        ValueError: timestep-aware layers disagree on the calibrated timesteps.
    """
    old = getattr(denoiser, _HOOK_ATTR, None)
    if old is not None:
        old.remove()
        setattr(denoiser, _HOOK_ATTR, None)
    layers: list[tuple[nn.Module, torch.Tensor]] = []
    for m in denoiser.modules():
        t = getattr(m, "act_timesteps", None)
        if isinstance(t, torch.Tensor):
            layers.append((m, t))
    if not layers:
        return None
    ref = layers[0][1]
    if any(t.shape != ref.shape or not torch.equal(t.cpu(), ref.cpu()) for _, t in layers):
        raise ValueError("timestep-aware layers were calibrated on different timesteps; rebuild the bundle")
    selector = StepSelector(ref)
    for m, _ in layers:
        setattr(m, "step_selector", selector)  # noqa: B010 - an attribute of our own Q-modules
    setattr(denoiser, _HOOK_ATTR, denoiser.register_forward_pre_hook(selector, with_kwargs=True))
    return selector
