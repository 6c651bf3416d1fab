"""Between our parameter dicts and Flower records: name-keyed, never matched by position.

A payload is an ``ArrayRecord`` with one array per wire dtype: the tensors of that dtype, in name
order, flattened into one, under a key that lists each tensor's name and shape (so clients of
different ranks, or different adapters, can never be mixed up). One array per tensor would cost far
more: Flower ships every array as an object of its own, with an HTTP request per object and hop
(server to SuperLink to SuperNode to ClientApp, and back), and with the 26 tensors of the default
adapter those requests, not the bytes, took most of a loopback round's time (measured: see
``benchmarks/deployment.py``). Flower's DP clipping mod works on the packed arrays unchanged (the
clipped norm is that of all tensors together). With ``compression`` fp16/bf16 the sender
casts floating tensors to the wire dtype and the receiver casts them back, exactly as the local
engine's :func:`pf2lora.compression.transmit` does; bf16, which NumPy lacks, travels as raw bytes.
A client's state (personal adapter, optimizer moments, sampler cursor) is kept in the node's
``Context`` as one ``torch.save`` of its packed form, the same bytes the local engine keeps on disk.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects

from pf2lora.algorithms.base import Params
from pf2lora.compression import compress

_RAW = "torch-raw"  # our stype for dtypes NumPy cannot hold (bfloat16)
_PACKED = "pf2lora.packed:"  # key prefix of an array holding several tensors; then their [name, shape] list

METRIC = "metric."  # prefix of a client's final metrics in the save query's config (for its model card)


def _array(tensor: torch.Tensor) -> Array:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        data = tensor.view(torch.int16).numpy().tobytes()
        return Array(dtype="bfloat16", shape=tuple(tensor.shape), stype=_RAW, data=data)
    return Array(tensor)


def _tensor(array: Array) -> torch.Tensor:
    if array.stype == _RAW and array.dtype == "bfloat16":
        flat = torch.frombuffer(bytearray(array.data), dtype=torch.int16).view(torch.bfloat16)
        return flat.reshape(tuple(array.shape)).clone()
    return torch.from_numpy(np.array(array.numpy()))  # a writable copy


def encode_params(params: Params, compression: str = "none") -> ArrayRecord:
    """The payload as sent: the tensors cast to the wire dtype, those of each dtype packed into one
    array in name order, under a key naming each tensor and its shape."""
    wire = compress(params, compression)
    groups: dict[torch.dtype, list[str]] = {}
    for name in sorted(wire):
        groups.setdefault(wire[name].dtype, []).append(name)
    record = ArrayRecord()
    for names in groups.values():
        layout = json.dumps([[name, list(wire[name].shape)] for name in names], separators=(",", ":"))
        record[_PACKED + layout] = _array(torch.cat([wire[name].detach().reshape(-1).cpu() for name in names]))
    return record


def param_names(record: ArrayRecord) -> list[str]:
    """The names of the tensors a record holds (those packed by :func:`encode_params`, and any other
    array under its own key)."""
    names = []
    for key in record:
        names += [name for name, _ in json.loads(key[len(_PACKED) :])] if key.startswith(_PACKED) else [key]
    return names


def decode_params(record: ArrayRecord, dtype: torch.dtype | None = None, cast: bool = True) -> Params:
    """The payload as received; floating tensors cast back to ``dtype`` (default: torch's default),
    or, with ``cast=False``, in the dtype they travelled in."""
    dtype = dtype or torch.get_default_dtype()
    out = {}
    for key in record:
        if not key.startswith(_PACKED):
            raise ValueError(f"array {key!r} is not a pf2lora payload")
        flat, layout = _tensor(record[key]), json.loads(key[len(_PACKED) :])
        sizes = [math.prod(shape) for _, shape in layout]
        if sum(sizes) != flat.numel():
            raise ValueError(f"a payload array holds {flat.numel()} values, its layout {sum(sizes)}")
        for (name, shape), value in zip(layout, flat.split(sizes), strict=True):
            value = value.reshape(shape)
            out[name] = (value.to(dtype) if cast and value.is_floating_point() else value).clone()
    return dict(sorted(out.items()))


def encode_config(config: dict[str, Any]) -> ConfigRecord:
    return ConfigRecord({k: v for k, v in config.items() if v is not None})


def encode_metrics(metrics: dict[str, Any]) -> MetricRecord:
    """Numbers only (bools as 0/1); anything else is not a metric and is dropped."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)):
            out[key] = value
    return MetricRecord(out)


def message_bytes(message: InflatableObject) -> int:
    """Bytes of a message (or of its content) as Flower ships it: every object of its tree
    (message, records, arrays, array chunks), each serialized once, as the SuperLink stores and
    forwards them."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
