"""What the server checks in a client's update before it aggregates it.

A reply is rejected, with the reason, when (in this order):

1. its structure is not the method's (:meth:`ServerAlgorithm.check_reply`; by default the names,
   shapes and dtypes of what the server sent: a missing tensor, an extra one such as a personal
   parameter, another shape or another dtype);
2. a value is not finite (NaN, +-Inf);
3. ``norm_bound`` is set and the update's L2 norm, over every tensor it returns, exceeds it. The
   update is the reply minus what the client was sent (where a method returns a smaller tensor, as
   HETLoRA's pruned ranks, minus the leading block of what was sent).

Both engines apply it to what arrived: the local engine to the client's reply, Flower's server to
the arrays of the message, before casting them back from the wire dtype.
"""

from __future__ import annotations

import math

import torch

from pf2lora.algorithms.base import Instruction, Params, ServerAlgorithm, TrainResult
from pf2lora.config import SPOILS


def update_norm(sent: Params, got: Params) -> float:
    """L2 norm of ``got - sent`` over every floating tensor of ``got`` (``sent`` cut to its shape)."""
    total = 0.0
    for name, value in got.items():
        if not value.is_floating_point():
            continue
        base = sent[name][tuple(slice(0, s) for s in value.shape)]
        total += float((value.double() - base.double()).square().sum())
    return math.sqrt(total)


def problem(
    server: ServerAlgorithm, instruction: Instruction, reply: TrainResult, norm_bound: float | None
) -> str | None:
    """Why the server rejects ``reply`` to ``instruction`` (None: it aggregates it)."""
    reason = server.check_reply(instruction, reply)
    if reason is not None:
        return reason
    for name, value in reply.params.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{name} has non-finite values"
    if norm_bound is not None:
        norm = update_norm(instruction.params, reply.params)
        if norm > norm_bound:
            return f"update norm {norm:.4g} exceeds the bound {norm_bound:g}"
    return None


def spoil(params: Params, kind: str) -> Params:
    """A copy of ``params`` made bad in one way (fault injection, to exercise these checks): a NaN or
    an Inf in a tensor, a tensor of another shape, one missing, a personal parameter added, a
    tensor in another dtype, or an update 1,000 further away than it was."""
    out = {k: v.clone() for k, v in params.items()}
    name = sorted(k for k in out if out[k].is_floating_point())[0]
    value = out[name]
    if kind in ("nan", "inf"):
        value.view(-1)[0] = float(kind)
    elif kind == "shape":
        out[name] = torch.zeros(value.shape[0] + 1, *value.shape[1:], dtype=value.dtype)
    elif kind == "missing":
        del out[name]
    elif kind == "personal":
        out[name.replace(".common.", ".personal.") if ".common." in name else name + ".personal"] = value
    elif kind == "dtype":
        out[name] = value.float() if value.dtype == torch.float64 else value.double()
    elif kind == "far":
        value += 1000.0
    else:
        raise ValueError(f"unknown kind of bad update {kind!r} (choose from {', '.join(SPOILS)})")
    return out
