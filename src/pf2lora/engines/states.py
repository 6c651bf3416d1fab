"""Where the in-process engine keeps client states: packed in memory, or on disk.

A client's state (personal adapter, optimizer moments, sampler cursor) is a nested structure of
many small tensors. Held as they are, thousands of clients' tensors interleave on the heap with
every step's transient buffers and fragment it, so resident memory grows several times faster
than the states themselves. :func:`pack` copies a state's tensors into one contiguous buffer per
dtype; :func:`unpack` hands back views of it, so a held client costs its own bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pf2lora.algorithms.base import ClientState


@dataclass
class Packed:
    """A state with every tensor replaced by ``_Slot`` s into ``buffers`` (one per dtype)."""

    skeleton: Any
    buffers: dict[torch.dtype, torch.Tensor]


@dataclass(frozen=True)
class _Slot:
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]


def pack(state: ClientState) -> Packed:
    tensors: dict[torch.dtype, list[torch.Tensor]] = {}
    sizes: dict[torch.dtype, int] = {}

    def walk(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            offset = sizes.get(item.dtype, 0)
            tensors.setdefault(item.dtype, []).append(item.detach().reshape(-1))
            sizes[item.dtype] = offset + item.numel()
            return _Slot(item.dtype, offset, tuple(item.shape))
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(walk(v) for v in item)
        return item

    skeleton = walk(state)
    return Packed(skeleton, {dtype: torch.cat(parts) for dtype, parts in tensors.items()})


def unpack(packed: Packed) -> ClientState:
    """The state, its tensors views of a fresh copy of the buffers: whatever a client then does
    to them in place (an optimizer step) never touches the stored state."""
    buffers = {dtype: buffer.clone() for dtype, buffer in packed.buffers.items()}

    def walk(item: Any) -> Any:
        if isinstance(item, _Slot):
            size = int(torch.Size(item.shape).numel())
            return buffers[item.dtype][item.offset : item.offset + size].view(item.shape)
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return type(item)(walk(v) for v in item)
        return item

    return walk(packed.skeleton)


class PackedStates(MutableMapping[int, ClientState]):
    """Client states in memory, each packed into contiguous buffers."""

    def __init__(self) -> None:
        self._packed: dict[int, Packed] = {}

    def __getitem__(self, cid: int) -> ClientState:
        return unpack(self._packed[cid])

    def __setitem__(self, cid: int, state: ClientState) -> None:
        self._packed[cid] = pack(state)

    def __delitem__(self, cid: int) -> None:
        del self._packed[cid]

    def __iter__(self) -> Iterator[int]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


class DiskStates(MutableMapping[int, ClientState]):
    """Client states in files (one ``torch.save`` per client), so memory holds one at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: int) -> Path:
        return self.folder / f"client{cid}.pt"

    def __getitem__(self, cid: int) -> ClientState:
        if not self._path(cid).exists():
            raise KeyError(cid)
        return unpack(torch.load(self._path(cid), weights_only=False))

    def __setitem__(self, cid: int, state: ClientState) -> None:
        tmp = self._path(cid).with_suffix(".tmp")
        torch.save(pack(state), tmp)
        tmp.replace(self._path(cid))  # never a half-written state

    def __delitem__(self, cid: int) -> None:
        self._path(cid).unlink()

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(int(p.stem[len("client") :]) for p in self.folder.glob("client*.pt")))

    def __len__(self) -> int:
        return len(list(self.folder.glob("client*.pt")))
