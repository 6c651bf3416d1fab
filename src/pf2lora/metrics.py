"""Per-client metrics combined over clients: their mean (the paper reports it) and spread."""

from __future__ import annotations

import numpy as np

VALIDATION_PREFIX = "val_"  # validation metrics are reported as val_<metric> beside the test metrics


def averaged(metrics: dict[str, float]) -> list[str]:
    """The names of a client's metrics that are averaged over clients: all but the example counts
    (``num_examples``, ``val_num_examples``)."""
    return [k for k in metrics if not k.endswith("num_examples")]


def summarize(per_client: dict[int, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation over clients of every numeric metric (the paper reports the mean)."""
    keys = averaged(next(iter(per_client.values())))
    values = {k: np.array([m[k] for m in per_client.values()], dtype=float) for k in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {k: float(v.std()) for k, v in values.items()}
