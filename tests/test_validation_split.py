"""data.validation_fraction: each client's validation rows are a seeded share of its own training
rows (disjoint, nothing lost, groups kept whole), the test split untouched; runs report val_
metrics beside test metrics; compare builds its table from either split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pf2lora.cli import main, per_method_overrides
from pf2lora.config import ConfigError, DataConfig, load_config
from pf2lora.data.sources import TextSplits
from pf2lora.data.text import EvalSets, client_indices, client_splits, hold_out

LABELS = np.repeat([0, 1, 2], [300, 200, 100])


def _splits() -> TextSplits:
    train = pd.DataFrame({"text": [f"t{i}" for i in range(600)], "label": LABELS})
    test = pd.DataFrame({"text": [f"s{i}" for i in range(120)], "label": LABELS[::5]})
    return TextSplits(train, test, ["a", "b", "c"])


def test_each_clients_validation_rows_are_a_share_of_its_own_training_rows() -> None:
    splits = _splits()
    cfg = DataConfig(num_clients=4, heterogeneity=0.9, validation_fraction=0.25)
    train, validation, test = client_splits(splits, cfg, seed=3)
    before, before_test = client_indices(splits, cfg, seed=3)
    assert validation is not None
    for kept, held, whole in zip(train, validation, before, strict=True):
        assert not set(kept) & set(held)
        np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), whole)  # nothing lost or added
        assert len(held) == round(0.25 * len(whole))
    for a, b in zip(test, before_test, strict=True):
        np.testing.assert_array_equal(a, b)  # the test split as without a validation split
    again = client_splits(splits, cfg, seed=3)[1]
    assert all(np.array_equal(a, b) for a, b in zip(validation, again, strict=True))  # seeded
    other = client_splits(splits, cfg, seed=4)[1]
    assert not all(np.array_equal(a, b) for a, b in zip(validation, other, strict=True))


def test_no_validation_fraction_changes_nothing() -> None:
    splits = _splits()
    cfg = DataConfig(num_clients=4)
    train, validation, test = client_splits(splits, cfg, seed=0)
    expected_train, expected_test = client_indices(splits, cfg, seed=0)
    assert validation is None
    assert all(np.array_equal(a, b) for a, b in zip(train, expected_train, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(test, expected_test, strict=True))


def test_groups_stay_on_one_side() -> None:
    groups = np.repeat(np.arange(30), 4)  # 30 contexts of 4 questions each
    train, held = hold_out([np.arange(120)], 0.2, seed=0, groups=groups)
    assert not set(groups[train[0]]) & set(groups[held[0]])
    assert len(set(groups[held[0]])) == 6


def test_a_client_left_without_training_or_validation_rows_is_refused() -> None:
    splits = _splits()
    with pytest.raises(ConfigError, match="leaves client 0 without training examples"):
        client_splits(splits, DataConfig(num_clients=100, partition="iid", validation_fraction=0.95), seed=0)
    with pytest.raises(ConfigError, match="without validation examples"):
        client_splits(splits, DataConfig(num_clients=100, partition="iid", validation_fraction=0.05), seed=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.validation_fraction=1.0"], "data.validation_fraction must be in [0, 1)"),
        (["data.validation_fraction=-0.1"], "data.validation_fraction must be in [0, 1)"),
        (["data.evaluate_test=false"], "set data.validation_fraction > 0"),
    ],
)
def test_bad_validation_settings(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(None, overrides)


def test_evaluation_sets_name_each_split() -> None:
    sets = EvalSets({"test": [1, 2], "validation": [3, 4]})
    assert len(sets) == 2 and sets[1] == {"test": 2, "validation": 4}
    with pytest.raises(ValueError, match="different client counts"):
        EvalSets({"test": [1, 2], "validation": [3]})


TINY = [
    "data.num_clients=2",
    "data.max_examples=64",
    "data.max_test_examples=16",
    "train.rounds=1",
    "train.local_steps=1",
    "train.batch_size=4",
    "model.max_length=24",
]


@pytest.mark.integration
def test_a_run_reports_validation_metrics_beside_test_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *TINY, "algorithms=[homlora]", "data.validation_fraction=0.25", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())["homlora"]
    assert result["metric_names"][0] == "accuracy"
    for metrics in result["clients"].values():
        assert {"accuracy", "mcc", "val_accuracy", "val_mcc"} <= set(metrics)
        assert metrics["val_num_examples"] == 8  # a quarter of each client's 32 training examples
        assert metrics["num_examples"] == 8  # its test split as before
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_accuracy" in record["eval"]["0"]


def test_compare_from_the_validation_split_and_per_method_values(tmp_path: Path) -> None:
    from pf2lora import compare

    best = tmp_path / "best.yaml"
    best.write_text(
        "per_method:\n  pf2lora:\n    train: {lr: 0.003, lower_lr: 0.5}\n  homlora:\n    train: {lr: 0.01}\n"
    )
    items = ["seeds=0,1", "data.validation_fraction=0.2", *per_method_overrides(best)]
    grid = compare.plan("configs/default.yaml", items, split="validation", metric="mcc")
    assert grid.metric == "val_mcc"
    configs = {row.algorithm: cfg for row, _, _, cfg in grid.runs}
    assert configs["pf2lora"].for_method("pf2lora").train.lower_lr == 0.5
    assert configs["homlora"].for_method("homlora").train.lr == 0.01
    with pytest.raises(ConfigError, match="needs data.validation_fraction > 0"):
        compare.plan("configs/default.yaml", ["seeds=0"], split="validation")
    (tmp_path / "empty.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="holds no per_method block"):
        per_method_overrides(tmp_path / "empty.yaml")
