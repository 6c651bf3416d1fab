"""Per-client minibatch sampling without replacement, resumable from a small cursor.

The cursor (epoch, position) lives in the client's state, so a client that is re-created every
round (as on Flower) draws exactly the batches it would have drawn in one process.
"""

from __future__ import annotations

import torch

from pf2lora.utils import generator


def draw(cursor: dict[str, int], size: int, count: int, *seed: object) -> list[int]:
    """Take the next ``count`` indices of a per-epoch permutation of ``range(size)``.

    The permutation of epoch e is drawn from ``(seed..., e)``; ``cursor`` is advanced in place.
    """
    if size <= 0:
        raise ValueError("cannot sample from an empty dataset")
    out: list[int] = []
    while len(out) < count:
        epoch, pos = cursor.get("epoch", 0), cursor.get("pos", 0)
        perm = torch.randperm(size, generator=generator(*seed, epoch)).tolist()
        take = perm[pos : pos + count - len(out)]
        out.extend(take)
        pos += len(take)
        if pos >= size:
            epoch, pos = epoch + 1, 0
        cursor["epoch"], cursor["pos"] = epoch, pos
    return out
