"""Per-client metrics combined over clients: their mean (the paper reports it) and spread."""

from __future__ import annotations

import numpy as np


def summarize(per_client: dict[int, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation over clients of every numeric metric (the paper reports the mean)."""
    keys = [k for k in next(iter(per_client.values())) if not k.endswith("num_examples")]  # also val_num_examples
    values = {k: np.array([m[k] for m in per_client.values()], dtype=float) for k in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {k: float(v.std()) for k, v in values.items()}
