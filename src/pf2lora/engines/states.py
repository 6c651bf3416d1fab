"""Where the in-process engine keeps client states: packed in memory, or on disk.

A client's state (personal adapter, optimizer moments, sampler cursor) is a nested structure of
many small tensors. Held as they are, thousands of clients' tensors interleave on the heap with
every step's transient buffers and fragment it, so resident memory grows several times faster
than the states themselves. :func:`pack` copies a state's tensors into one contiguous buffer per
dtype; :func:`unpack` hands back views of it, so a held client costs its own bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pf2lora.algorithms.base import ClientState
from pf2lora.utils import atomic_write


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


def unpack(packed: Packed, copy: bool = True) -> ClientState:
    """The state, its tensors views of a fresh copy of the buffers: whatever a client then does
    to them in place (an optimizer step) never touches the stored state. ``copy=False``: views of
    ``packed``'s own buffers, for a ``packed`` nothing else holds (one just received from a pipe)."""
    buffers = {dtype: buffer.clone() if copy else buffer for dtype, buffer in packed.buffers.items()}

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
    """Client states in memory, each packed into contiguous buffers; ``mirror``: also written to
    these versioned files as they change (the run's resume point, :class:`DiskStates`), from
    which :meth:`rollback` reads them back."""

    def __init__(self, mirror: DiskStates | None = None) -> None:
        self._packed: dict[int, Packed] = {}
        self.mirror = mirror

    def rollback(self, last_round: int) -> None:
        """Every client's state as of round ``last_round``, read back from the mirror."""
        if self.mirror is not None:
            self.mirror.rollback(last_round)
            self._packed = {cid: self.mirror.packed(cid) for cid in self.mirror}

    def packed(self, cid: int) -> Packed:
        """Client ``cid``'s state as it is held (not to be changed in place)."""
        return self._packed[cid]

    def __getitem__(self, cid: int) -> ClientState:
        return unpack(self._packed[cid])

    def __setitem__(self, cid: int, state: ClientState) -> None:
        self.write(cid, pack(state))

    def write(self, cid: int, packed: Packed) -> None:
        """Hold ``packed`` (which nothing else may change afterwards) as client ``cid``'s state."""
        self._packed[cid] = packed
        if self.mirror is not None:
            self.mirror.write(cid, packed)

    def __delitem__(self, cid: int) -> None:
        del self._packed[cid]
        if self.mirror is not None:
            del self.mirror[cid]

    def __iter__(self) -> Iterator[int]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def round(self) -> int:
        return self.mirror.round if self.mirror is not None else 0

    @round.setter
    def round(self, value: int) -> None:
        if self.mirror is not None:
            self.mirror.round = value


_VERSION = re.compile(r"client(\d+)\.r(\d+)\.pt")


class DiskStates(MutableMapping[int, ClientState]):
    """Client states in files, one per client and round it was written in (``client<k>.r<round>.pt``,
    ``round`` set by the engine before it writes), so memory holds one at a time. A read gives a
    client's latest version; the two latest are kept, so that a crash in the middle of a round
    leaves every client's state as of the last complete round (the latest version written in a
    round at or before it), which :meth:`rollback` returns to. Each file is written whole, then
    renamed in."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.round = folder, 0
        folder.mkdir(parents=True, exist_ok=True)
        self._versions: dict[int, list[int]] = {}
        for path in folder.glob("client*.pt"):
            if match := _VERSION.fullmatch(path.name):
                self._versions.setdefault(int(match[1]), []).append(int(match[2]))
        for tags in self._versions.values():
            tags.sort()

    def _path(self, cid: int, tag: int) -> Path:
        return self.folder / f"client{cid}.r{tag}.pt"

    def packed(self, cid: int) -> Packed:
        if not self._versions.get(cid):
            raise KeyError(cid)
        return torch.load(self._path(cid, self._versions[cid][-1]), weights_only=False)

    def __getitem__(self, cid: int) -> ClientState:
        return unpack(self.packed(cid))

    def __setitem__(self, cid: int, state: ClientState) -> None:
        self.write(cid, pack(state))

    def write(self, cid: int, packed: Packed) -> None:
        """Client ``cid``'s packed state as its version of this ``round``; versions but the two latest removed."""
        atomic_write(self._path(cid, self.round), lambda tmp: torch.save(packed, tmp))  # never half-written
        tags = sorted({*self._versions.get(cid, []), self.round})
        for old in tags[:-2]:
            self._path(cid, old).unlink(missing_ok=True)
        self._versions[cid] = tags[-2:]

    def rollback(self, last_round: int, cid: int | None = None) -> None:
        """Forget every version written after round ``last_round`` (a crashed round's): of client
        ``cid`` alone, or of every client (another process may be writing the others')."""
        chosen = self._versions if cid is None else {cid: self._versions.get(cid, [])}
        for cid, tags in list(chosen.items()):
            for tag in [t for t in tags if t > last_round]:
                self._path(cid, tag).unlink(missing_ok=True)
            self._versions[cid] = [t for t in tags if t <= last_round]
            if not self._versions[cid]:
                del self._versions[cid]

    def __delitem__(self, cid: int) -> None:
        for tag in self._versions.pop(cid):
            self._path(cid, tag).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._versions))

    def __len__(self) -> int:
        return len(self._versions)
