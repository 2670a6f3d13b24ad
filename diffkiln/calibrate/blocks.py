"""The denoiser's blocks, found from one traced call: what a cache schedule skips and reuses.

The blocks are the units the denoiser's forward runs in sequence: every element of its module
lists (``nn.ModuleList`` children) that the call runs, and every other child with parameters that
runs between the first and the last of them (a UNet's mid block), in call order. A wrapper whose
one child holds the parameters is looked through. Nothing is read from class or attribute names.

A module list is *residual-capable* when, in the traced call, every tensor a block returns is
passed, as that very tensor object, to the next block of the list as one of its arguments, the same
way for every pair of neighbours, with the same shape going in and out: its blocks then pass a set
of hidden-state *streams* on, and a range of them can be skipped by adding back the residual they
added (DBCache). A UNet's down blocks (which also return skip tensors for the up blocks) are not;
any sequence of three or more blocks can still reuse its deep blocks' outputs (DeepCache).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffkiln.core.arguments import bind_call
from diffkiln.core.cache_schedule import Stream
from diffkiln.core.hooks import scoped_hooks

__all__ = ["BlockLayout", "BlockList", "find_blocks"]


@dataclass(frozen=True)
class BlockList:
    """A run of consecutive blocks from one module list.

    Attributes:
        start: index of its first block in :attr:`BlockLayout.blocks`.
        end: one past its last block.
        streams: the streams its blocks pass on, when residual-capable; else empty.
        output_arity: 0 when a block returns one tensor, else its tuple's length.
        residual_end: one past the last block whose outputs carry every stream (a last block may
            return None for a stream it ends, as SD3's does); skipped ranges end there at most.
    """

    start: int
    end: int
    streams: tuple[Stream, ...] = ()
    output_arity: int = 0
    residual_end: int = 0

    @property
    def residual_capable(self) -> bool:
        """True when a range of its blocks can be skipped by adding back their residual."""
        return bool(self.streams)


@dataclass(frozen=True)
class BlockLayout:
    """The denoiser's blocks and how they connect.

    Attributes:
        blocks: qualified module names, in call order.
        lists: the runs of blocks that come from one module list.
        evidence: how they were found.
    """

    blocks: tuple[str, ...]
    lists: tuple[BlockList, ...]
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "blocks": list(self.blocks),
            "lists": [
                {"start": b.start, "end": b.end, "output_arity": b.output_arity, "residual_end": b.residual_end,
                 "streams": [{"output_index": s.output_index, "argument": s.argument} for s in b.streams]}
                for b in self.lists
            ],
            "evidence": self.evidence,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BlockLayout:
        """Inverse of :meth:`to_dict`."""
        lists = tuple(
            BlockList(
                b["start"],
                b["end"],
                tuple(Stream(s["output_index"], s["argument"]) for s in b["streams"]),
                b["output_arity"],
                b["residual_end"],
            )
            for b in d["lists"]
        )
        return cls(tuple(d["blocks"]), lists, str(d["evidence"]))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _root(denoiser: nn.Module) -> tuple[str, nn.Module]:
    """Look through wrappers: descend while one child holds (almost) all the parameters."""
    prefix, module = "", denoiser
    total = _params(denoiser)
    while True:
        children = [(n, c) for n, c in module.named_children() if _params(c) > 0]
        if len(children) != 1 or isinstance(children[0][1], nn.ModuleList) or _params(children[0][1]) < 0.99 * total:
            return prefix, module
        name, module = children[0]
        prefix = f"{prefix}{name}."


def _outputs(out: Any) -> tuple[list[Any], int]:
    """A block's top-level outputs and the arity (0: one tensor)."""
    if isinstance(out, torch.Tensor):
        return [out], 0
    if isinstance(out, (tuple, list)):
        return list(out), len(out)
    return [out], -1  # an output object the streams cannot be read from


def _streams(calls: list[tuple[dict[str, Any], Any]]) -> tuple[tuple[Stream, ...], int, int]:
    """The streams consecutive calls of one list pass on (or () when they do not qualify), the
    output arity, and how many leading calls return every stream with its input's shape."""
    if len(calls) < 2:
        return (), 0, 0
    found: tuple[Stream, ...] | None = None
    arity = None
    for (_, out), (bound_next, _) in itertools.pairwise(calls):
        outs, n = _outputs(out)
        if n < 0 or (arity is not None and n != arity):
            return (), 0, 0
        arity = n
        streams = []
        for i, t in enumerate(outs):
            if not isinstance(t, torch.Tensor):
                return (), 0, 0
            names = [k for k, v in bound_next.items() if v is t]
            if len(names) != 1:
                return (), 0, 0
            streams.append(Stream(i, names[0]))
        if found is not None and tuple(streams) != found:
            return (), 0, 0
        found = tuple(streams)
    assert found is not None and arity is not None
    qualified = 0
    for bound, out in calls:  # same shape in and out, so that a residual can be added back
        outs, n = _outputs(out)
        ok = n == arity and all(
            isinstance(bound.get(s.argument), torch.Tensor) and isinstance(outs[s.output_index], torch.Tensor)
            and bound[s.argument].shape == outs[s.output_index].shape for s in found
        )  # fmt: skip
        if not ok:
            break
        qualified += 1
    return (found, arity, qualified) if qualified >= 1 else ((), 0, 0)


def find_blocks(denoiser: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> BlockLayout:
    """Replay one denoiser call and find its blocks (see the module docstring).

    Args:
        denoiser: the model (unchanged; hooks removed on exit).
        args: one call's positional arguments.
        kwargs: its keyword arguments.
    """
    prefix, root = _root(denoiser)
    units: dict[str, nn.Module] = {}
    list_of: dict[str, str] = {}
    for name, child in root.named_children():
        if isinstance(child, nn.ModuleList):
            for i, element in enumerate(child):
                units[f"{prefix}{name}.{i}"] = element
                list_of[f"{prefix}{name}.{i}"] = name
        elif _params(child) > 0:
            units[f"{prefix}{name}"] = child
    order: list[str] = []
    seen: dict[str, list[tuple[dict[str, Any], Any]]] = {}

    def make_hook(name: str) -> Any:
        def hook(m: nn.Module, a: tuple[Any, ...], k: dict[str, Any], out: Any) -> None:
            order.append(name)
            seen.setdefault(name, []).append((bind_call(m, a, k), out))

        return hook

    with scoped_hooks() as hooks, torch.no_grad():
        for name, module in units.items():
            hooks.add_forward_hook(f"diffkiln.blocks.{name}", module, make_hook(name))
        denoiser(*args, **kwargs)
    once = [n for n in order if len(seen[n]) == 1]
    listed = [i for i, n in enumerate(once) if n in list_of]
    if not listed:
        blocks = tuple(once)
        evidence = "no module list runs: the blocks are the children with parameters, in call order"
        return BlockLayout(blocks, (), evidence)
    blocks = tuple(n for i, n in enumerate(once) if listed[0] <= i <= listed[-1])
    runs: list[BlockList] = []
    start = 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or list_of.get(blocks[i]) != list_of.get(blocks[start]) or blocks[start] not in list_of:
            if blocks[start] in list_of:
                streams, arity, qualified = _streams([seen[n][0] for n in blocks[start:i]])
                runs.append(BlockList(start, i, streams, arity, start + qualified))
            start = i
    lists = ", ".join(f"{b.end - b.start} from {list_of[blocks[b.start]]}" for b in runs)
    capable = sum(b.residual_capable for b in runs)
    evidence = (f"{len(blocks)} blocks in call order ({lists}, plus {len(blocks) - sum(b.end - b.start for b in runs)} "
                f"between them); {capable} of {len(runs)} lists pass hidden-state streams on")  # fmt: skip
    return BlockLayout(blocks, tuple(runs), evidence)
