"""Classification metrics on hand-computed cases, through the task's client-side evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from pf2lora.metrics import summarize
from pf2lora.tasks.classification import Classification


class _Fixed:
    """A client's split whose 'model output' is a one-hot of a fixed prediction per example."""

    def __init__(self, pred: list[int], true: list[int], num_labels: int = 2) -> None:
        self.logits = torch.nn.functional.one_hot(torch.tensor(pred), num_labels).float()
        self.labels = torch.tensor(true)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: list[int], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.logits[indices], "labels": self.labels[indices]}


def _evaluate(data: _Fixed, batch_size: int = 4) -> dict[str, float]:
    return Classification().evaluate(lambda b: b["logits"], data, batch_size, torch.device("cpu"))


def test_binary_metrics_by_hand_over_several_batches() -> None:
    # true  1 1 1 0 0 0 ; pred 1 1 0 0 0 1 -> TP 2, FN 1, TN 2, FP 1 (batches of 4 and 2)
    m = _evaluate(_Fixed([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]))
    assert m["accuracy"] == pytest.approx(4 / 6)
    # MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert m["mcc"] == pytest.approx(1 / 3)
    # F1 of each class = 2*2 / (2*2 + 1 + 1) = 2/3
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["num_examples"] == 6
    # cross-entropy of one-hot logits: log(1 + e^-1) when right, log(1 + e) when wrong
    right, wrong = math.log(1 + math.exp(-1)), math.log(1 + math.e)
    assert m["loss"] == pytest.approx((4 * right + 2 * wrong) / 6)


def test_constant_prediction_has_zero_mcc() -> None:
    m = _evaluate(_Fixed([0, 0, 0, 0], [0, 1, 0, 1]))
    assert m["accuracy"] == 0.5 and m["mcc"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_macro_f1_averages_over_the_labels_present_as_scikit_learn_does() -> None:
    # a 3-way head, but label 2 appears neither in truth nor in prediction: the same as the binary case
    m = _evaluate(_Fixed([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0], num_labels=3))
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_summary_mean_and_spread_over_clients() -> None:
    mean, std = summarize({0: {"accuracy": 0.5, "num_examples": 3}, 1: {"accuracy": 0.9, "num_examples": 9}})
    assert mean == {"accuracy": pytest.approx(0.7)}
    assert std["accuracy"] == pytest.approx(0.2)
    assert not math.isnan(std["accuracy"])
