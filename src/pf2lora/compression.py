"""What travels between server and clients: optional fp16 / bf16 compression of tensor payloads.

``transmit`` is the whole trip: the sender casts floating tensors to the wire dtype, the receiver
casts them back to their own dtype; the bytes are those of the serialized compressed payload.
"""

from __future__ import annotations

import torch

from pf2lora.algorithms.base import Params
from pf2lora.utils import payload_bytes

WIRE_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def compress(params: Params, compression: str) -> Params:
    wire = WIRE_DTYPES[compression]
    if wire is None:
        return params
    return {k: v.to(wire) if v.is_floating_point() else v for k, v in params.items()}


def transmit(params: Params, compression: str) -> tuple[Params, int]:
    """The payload as the receiver gets it, and its size on the wire in bytes (0 when nothing travels)."""
    if not params:
        return params, 0
    sent = compress(params, compression)
    received = {k: sent[k].to(v.dtype) for k, v in params.items()} if sent is not params else params
    return received, payload_bytes(sent)
