"""Sequence classification (the paper's GLUE experiments): a classifier head, cross-entropy, and
accuracy, Matthews correlation (CoLA's metric) and macro-F1 from each client's confusion matrix."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch import Tensor, nn

from pf2lora.config import ExperimentConfig
from pf2lora.data.text import FederatedData, build_federated_data
from pf2lora.tasks.base import Batch, Forward, Task


def logits_of(outputs: Any) -> Tensor:
    """A model output's logits (a transformers output, or the logits tensor itself)."""
    return outputs if isinstance(outputs, Tensor) else outputs.logits


class Classification(Task):
    name = "classification"
    metrics = ("accuracy", "mcc", "macro_f1")
    primary = "accuracy"
    head_candidates = ("classifier", "score")

    def __init__(self, num_labels: int | None = None) -> None:
        self.num_labels = num_labels  # the head's size; evaluation reads it from the logits

    @classmethod
    def build(cls, cfg: ExperimentConfig, tokenizer: Any) -> tuple[Classification, FederatedData]:
        data = build_federated_data(cfg.data, tokenizer, cfg.model.max_length, cfg.seed)
        return cls(data.num_labels), data

    def load_model(self, name: str, dropout: float | None = None) -> nn.Module:
        from pf2lora.models import load_classifier

        assert self.num_labels is not None, "a classifier needs its number of labels"
        return load_classifier(name, self.num_labels, dropout)

    def loss(self, outputs: Any, batch: Batch, reduction: str = "mean") -> Tensor:
        logits = logits_of(outputs)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the loss in full precision
        return nn.functional.cross_entropy(logits, batch["labels"], reduction=reduction)

    @torch.no_grad()
    def evaluate(
        self, forward: Forward, data: Any, batch_size: int, device: torch.device, record: Path | None = None
    ) -> dict[str, float]:
        """One forward per batch gives the predictions and the loss; the confusion matrix (counts,
        which add across batches and clients) gives the metrics."""
        confusion: np.ndarray | None = None
        total = 0.0
        for start in range(0, len(data), batch_size):
            batch = data.batch(list(range(start, min(start + batch_size, len(data)))), device)
            outputs = forward(batch)
            total += self.loss(outputs, batch, reduction="sum").item()
            logits = logits_of(outputs)
            if confusion is None:
                confusion = np.zeros((logits.shape[-1], logits.shape[-1]), dtype=np.int64)
            np.add.at(confusion, (batch["labels"].cpu().numpy(), logits.argmax(-1).cpu().numpy()), 1)
        assert confusion is not None, "evaluate on an empty split"
        return {**confusion_metrics(confusion), "loss": total / len(data), "num_examples": int(confusion.sum())}


def confusion_metrics(confusion: np.ndarray) -> dict[str, float]:
    """Accuracy, MCC and macro-F1 (scikit-learn's) of the predictions a confusion matrix counts
    (rows: true label, columns: predicted). The metrics do not depend on the examples' order, so
    the label pairs are rebuilt from the counts and handed to scikit-learn as they are."""
    true, pred = np.nonzero(confusion)
    counts = confusion[true, pred]
    y_true, y_pred = np.repeat(true, counts), np.repeat(pred, counts)
    with warnings.catch_warnings():  # a client with one label in truth and prediction: MCC is 0
        warnings.simplefilter("ignore", UserWarning)
        mcc = float(matthews_corrcoef(y_true, y_pred))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "mcc": mcc,
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
