"""Classification metrics per client (scikit-learn), and their mean and spread over clients."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pf2lora.algorithms.base import Prediction

METRICS = ("accuracy", "mcc", "macro_f1")


def classification_metrics(prediction: Prediction) -> dict[str, float]:
    """Accuracy, Matthews correlation (CoLA's metric) and macro-F1 of one client's predictions."""
    y_true = prediction.labels.numpy()
    y_pred = prediction.logits.argmax(-1).numpy()
    with warnings.catch_warnings():  # a client with one label in truth and prediction: MCC is 0
        warnings.simplefilter("ignore", UserWarning)
        mcc = float(matthews_corrcoef(y_true, y_pred))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "mcc": mcc,
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "loss": float(prediction.loss),
        "num_examples": int(len(y_true)),
    }


def summarize(per_client: dict[int, dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation over clients of every numeric metric (the paper reports the mean)."""
    keys = [k for k in next(iter(per_client.values())) if k != "num_examples"]
    values = {k: np.array([m[k] for m in per_client.values()], dtype=float) for k in keys}
    return {k: float(v.mean()) for k, v in values.items()}, {k: float(v.std()) for k, v in values.items()}
