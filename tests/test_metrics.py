"""Metrics on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from pf2lora.algorithms.base import Prediction
from pf2lora.metrics import classification_metrics, summarize


def _prediction(pred: list[int], true: list[int]) -> Prediction:
    logits = torch.nn.functional.one_hot(torch.tensor(pred), 2).float()
    return Prediction(logits, torch.tensor(true), loss=0.5)


def test_binary_metrics_by_hand() -> None:
    # true  1 1 1 0 0 0 ; pred 1 1 0 0 0 1 -> TP 2, FN 1, TN 2, FP 1
    m = classification_metrics(_prediction([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]))
    assert m["accuracy"] == pytest.approx(4 / 6)
    # MCC = (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3
    assert m["mcc"] == pytest.approx(1 / 3)
    # F1 of each class = 2*2 / (2*2 + 1 + 1) = 2/3
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["num_examples"] == 6


def test_constant_prediction_has_zero_mcc() -> None:
    m = classification_metrics(_prediction([0, 0, 0, 0], [0, 1, 0, 1]))
    assert m["accuracy"] == 0.5 and m["mcc"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_summary_mean_and_spread_over_clients() -> None:
    mean, std = summarize({0: {"accuracy": 0.5, "num_examples": 3}, 1: {"accuracy": 0.9, "num_examples": 9}})
    assert mean == {"accuracy": pytest.approx(0.7)}
    assert std["accuracy"] == pytest.approx(0.2)
    assert not math.isnan(std["accuracy"])
