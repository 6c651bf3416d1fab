"""Small shared helpers: stable seeds and tensor-dict arithmetic."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` that is the same in every process (unlike ``hash()``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


def clone_params(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def weighted_average(dicts: Iterable[Mapping[str, Tensor]], weights: Iterable[float]) -> dict[str, Tensor]:
    """``sum_k w_k d_k`` name by name, with the weights normalised to sum to one."""
    dicts, weights = list(dicts), [float(w) for w in weights]
    if not dicts:
        raise ValueError("nothing to average")
    total = sum(weights)
    out = {}
    for name in dicts[0]:
        acc = torch.zeros_like(dicts[0][name], dtype=torch.float64)
        for d, w in zip(dicts, weights, strict=True):
            acc += (w / total) * d[name].double()
        out[name] = acc.to(dicts[0][name].dtype)
    return out


def average_product(dicts: Iterable[Mapping[str, Tensor]], weights: Iterable[float], b: str, a: str) -> Tensor:
    """``sum_k w_k d_k[b] @ d_k[a]`` in float64, the weights normalised to sum to one (the average
    of clients' LoRA updates ``B_k A_k``, whatever their ranks)."""
    dicts, weights = list(dicts), [float(w) for w in weights]
    total = sum(weights)
    return sum((w / total) * (d[b].double() @ d[a].double()) for d, w in zip(dicts, weights, strict=True))


def numel(params: Mapping[str, Tensor]) -> int:
    """Number of elements over all tensors of a parameter dict."""
    return sum(t.numel() for t in params.values())


def l2_norm(params: Mapping[str, Tensor]) -> float:
    """Euclidean norm of a parameter dict taken as one vector (accumulated in float64)."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in params.values())))  # type: ignore[arg-type]


def fork_rng(device: torch.device):
    """``torch.random.fork_rng`` over the RNGs dropout draws from on ``device`` (CPU, and CUDA there)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def payload_bytes(params: Mapping[str, Tensor]) -> int:
    """Bytes of the payload as it travels: the name-keyed safetensors serialization."""
    return len(save({k: v.detach().contiguous().cpu() for k, v in params.items()}))


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The RNG state dropout draws from on ``device`` (CPU, plus the CUDA one when on a GPU)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so resident memory follows what
    is live; after a round of many simulated clients the allocator otherwise keeps their transient
    buffers. A no-op where there is no glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file of a unique name in the
    same folder, which is then renamed over ``path``. A crash leaves the old file or the new one,
    never half of one, and processes writing side by side never share a temporary file."""
    import os
    import tempfile

    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as JSON lines at ``path`` (its folder made), written whole (:func:`atomic_write`)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
