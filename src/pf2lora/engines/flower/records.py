"""Between our parameter dicts and Flower records: name-keyed, never matched by position.

A payload is an ``ArrayRecord`` whose keys are the parameter names (so clients of different
ranks, or different adapters, can never be mixed up). With ``compression`` fp16/bf16 the sender
casts floating tensors to the wire dtype and the receiver casts them back, exactly as the local
engine's :func:`pf2lora.compression.transmit` does; bf16, which NumPy lacks, travels as raw bytes.
A client's state (personal adapter, optimizer moments, sampler cursor) is kept in the node's
``Context`` as one ``torch.save`` of its packed form, the same bytes the local engine keeps on disk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects

from pf2lora.algorithms.base import Params
from pf2lora.compression import compress

_RAW = "torch-raw"  # our stype for dtypes NumPy cannot hold (bfloat16)

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
    """The payload as sent: each tensor under its own name (in name order), cast to the wire dtype."""
    record = ArrayRecord()
    wire = compress(params, compression)
    for name in sorted(wire):
        record[name] = _array(wire[name])
    return record


def decode_params(record: ArrayRecord, dtype: torch.dtype | None = None, cast: bool = True) -> Params:
    """The payload as received; floating tensors cast back to ``dtype`` (default: torch's default),
    or, with ``cast=False``, in the dtype they travelled in."""
    dtype = dtype or torch.get_default_dtype()
    out = {}
    for name in record:
        value = _tensor(record[name])
        out[name] = value.to(dtype) if cast and value.is_floating_point() else value
    return out


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
