"""The plan's sparse-attention section: block masks per attention layer, step group and head.

Pure data, versioned (``SPARSE_PLAN_VERSION``), read strictly: :meth:`SparsePlan.from_dict` refuses
unknown keys, wrong types, masks of the wrong size and rows that keep no block, with a
:class:`SparsePlanError` naming the field. A mask is stored packed: the ``(query_blocks,
key_blocks)`` bits in row order, little-endian within each byte, as hex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffkiln.core.errors import InvalidInputError

__all__ = ["SPARSE_PLAN_VERSION", "LayerMasks", "SparsePlan", "SparsePlanError", "pack_mask", "unpack_mask"]

SPARSE_PLAN_VERSION = 1


class SparsePlanError(InvalidInputError):
    """A sparse-attention plan section that is malformed or does not fit the model."""


def pack_mask(mask: torch.Tensor) -> str:
    """A boolean ``(query_blocks, key_blocks)`` mask as hex (row order, little-endian bits)."""
    bits = mask.flatten().to(torch.uint8)
    bits = torch.cat([bits, bits.new_zeros(-len(bits) % 8)]).view(-1, 8)
    return bytes((bits << torch.arange(8, dtype=torch.uint8)).sum(1).to(torch.uint8).tolist()).hex()


def unpack_mask(text: str, q_blocks: int, kv_blocks: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`.

    Raises:
        SparsePlanError: not hex, or not ``q_blocks * kv_blocks`` bits long.
    """
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise SparsePlanError("a mask must be a hex string") from None
    if len(raw) != math.ceil(q_blocks * kv_blocks / 8):
        raise SparsePlanError(f"a mask of {q_blocks}x{kv_blocks} blocks needs {math.ceil(q_blocks * kv_blocks / 8)} "
                              f"bytes, got {len(raw)}")  # fmt: skip
    byte = torch.tensor(list(raw), dtype=torch.uint8)
    bits = (byte[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten()[: q_blocks * kv_blocks].view(q_blocks, kv_blocks).bool()


@dataclass(frozen=True)
class LayerMasks:
    """One attention layer's masks.

    Attributes:
        layer: the layer's qualified module name.
        heads: attention heads.
        q_len: query tokens the masks are for.
        kv_len: key tokens the masks are for.
        grid: the token layout (``frames``, ``height``, ``width``, ``prefix``, ``suffix``).
        families: per step group, per head, the candidate chosen (e.g. ``"local(1,2,2)"``).
        masks: per step group, per head, the packed mask (:func:`pack_mask`).
    """

    layer: str
    heads: int
    q_len: int
    kv_len: int
    grid: dict[str, int]
    families: tuple[tuple[str, ...], ...]
    masks: tuple[tuple[str, ...], ...]

    def blocks(self, block: int) -> tuple[int, int]:
        """(query blocks, key blocks) at ``block`` tokens per block."""
        return math.ceil(self.q_len / block), math.ceil(self.kv_len / block)

    def mask(self, group: int, head: int, block: int) -> torch.Tensor:
        """The boolean block mask of one step group and head."""
        return unpack_mask(self.masks[group][head], *self.blocks(block))


@dataclass(frozen=True)
class SparsePlan:
    """Block masks for every masked attention layer, per step group and head.

    Attributes:
        block: tokens per block.
        steps: sampler steps the plan is for.
        calls_per_step: denoiser calls per step (CFG branches called separately share a step).
        group_starts: the first step of each step group (starts at 0, ascending).
        layers: the masked layers; other attention layers run dense.
        density: kept attention FLOPs over dense, over all masked and unmasked attention calls of
            a sampling run (as planned).
        budget: the density the search was given, in (0, 1].
        search: what the search measured; informational.
    """

    block: int
    steps: int
    calls_per_step: int
    group_starts: tuple[int, ...]
    layers: tuple[LayerMasks, ...]
    density: float
    budget: float
    search: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.block <= 0 or self.steps <= 0 or self.calls_per_step <= 0:
            raise SparsePlanError(f"block, steps and calls_per_step must be positive, got {self.block}, {self.steps} "
                                  f"and {self.calls_per_step}")  # fmt: skip
        starts = list(self.group_starts)
        if not starts or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= self.steps:
            raise SparsePlanError(f"group_starts must ascend from 0 below {self.steps} steps, got {starts}")
        if not 0 < self.budget <= 1:
            raise SparsePlanError(f"budget must be in (0, 1], got {self.budget}")
        for lm in self.layers:
            if len(lm.masks) != len(starts) or any(len(g) != lm.heads for g in lm.masks):
                raise SparsePlanError(f"layer {lm.layer}: needs one mask per step group ({len(starts)}) and head "
                                      f"({lm.heads})")  # fmt: skip
            for g in range(len(starts)):
                for h in range(lm.heads):
                    if not bool(lm.mask(g, h, self.block).any(1).all()):
                        raise SparsePlanError(
                            f"layer {lm.layer}, group {g}, head {h}: a query block keeps no key block"
                        )

    def group_of(self, step: int) -> int:
        """The step group of ``step``."""
        return max(i for i, s in enumerate(self.group_starts) if s <= step)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (read back by :meth:`from_dict`)."""
        return {
            "version": SPARSE_PLAN_VERSION,
            "block": self.block,
            "steps": self.steps,
            "calls_per_step": self.calls_per_step,
            "group_starts": list(self.group_starts),
            "density": self.density,
            "budget": self.budget,
            "search": self.search,
            "layers": [_layer_dict(lm) for lm in self.layers],
        }

    @classmethod
    def from_dict(cls, d: Any) -> SparsePlan:
        """Read :meth:`to_dict`'s form strictly.

        Raises:
            SparsePlanError: another version, an unknown or missing key, or a bad value.
        """
        keys = {"version", "block", "steps", "calls_per_step", "group_starts", "density", "budget", "search", "layers"}
        layer_keys = {"layer", "heads", "q_len", "kv_len", "grid", "families", "masks"}
        if not isinstance(d, dict) or set(d) != keys:
            raise SparsePlanError(f"a sparse-attention section has exactly the keys {sorted(keys)}")
        if d["version"] != SPARSE_PLAN_VERSION:
            raise SparsePlanError(f"sparse-attention section version {d['version']!r}; this diffkiln reads "
                                  f"{SPARSE_PLAN_VERSION}")  # fmt: skip
        layers = []
        for entry in d["layers"] if isinstance(d["layers"], list) else [None]:
            if not isinstance(entry, dict) or set(entry) != layer_keys:
                raise SparsePlanError(f"each masked layer has exactly the keys {sorted(layer_keys)}")
            ints = [entry[k] for k in ("heads", "q_len", "kv_len")]
            if not isinstance(entry["layer"], str) or not all(isinstance(i, int) and i > 0 for i in ints):
                raise SparsePlanError(f"layer {entry.get('layer')!r}: name and positive heads, q_len, kv_len")
            nested = [entry["families"], entry["masks"]]
            if not all(isinstance(x, list) and all(isinstance(g, list) and all(isinstance(s, str) for s in g)
                                                   for g in x) for x in nested):  # fmt: skip
                raise SparsePlanError(f"layer {entry['layer']}: families and masks are lists of lists of strings")
            heads, q_len, kv_len = ints
            families = tuple(tuple(g) for g in entry["families"])
            masks = tuple(tuple(g) for g in entry["masks"])
            layers.append(LayerMasks(entry["layer"], heads, q_len, kv_len, dict(entry["grid"]), families, masks))
        if not isinstance(d["group_starts"], list) or not all(isinstance(s, int) for s in d["group_starts"]):
            raise SparsePlanError("group_starts is a list of step indices")
        sizes = (int(d["block"]), int(d["steps"]), int(d["calls_per_step"]))
        return cls(*sizes, tuple(d["group_starts"]), tuple(layers), float(d["density"]), float(d["budget"]),
                   dict(d["search"]))  # fmt: skip


def _layer_dict(lm: LayerMasks) -> dict[str, Any]:
    return {"layer": lm.layer, "heads": lm.heads, "q_len": lm.q_len, "kv_len": lm.kv_len, "grid": dict(lm.grid),
            "families": [list(f) for f in lm.families], "masks": [list(m) for m in lm.masks]}  # fmt: skip
