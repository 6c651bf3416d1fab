"""Partitioners: sizes, label skew, determinism, nothing lost; train and test split alike."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pf2lora.config import ConfigError, DataConfig
from pf2lora.data import partition
from pf2lora.data.sources import TextSplits
from pf2lora.data.text import client_indices

LABELS = np.repeat([0, 1], [600, 400])  # 1000 examples, 60% label 0


def _all(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts))


@pytest.mark.parametrize("h", [0.0, 0.3, 0.9, 1.0])
def test_heterogeneity_loses_nothing_and_balances_sizes(h: float) -> None:
    parts = partition.by_heterogeneity(LABELS, 8, h, seed=0)
    np.testing.assert_array_equal(_all(parts), np.arange(1000))
    assert {len(p) for p in parts} <= {124, 125, 126}


def test_heterogeneity_one_gives_label_sorted_shards() -> None:
    parts = partition.by_heterogeneity(LABELS, 8, 1.0, seed=0)
    # 125 per client; the first 600 sorted examples are label 0: clients 0-3 pure 0, client 4 mixed
    label_sets = [set(LABELS[p]) for p in parts]
    assert label_sets[:4] == [{0}] * 4 and label_sets[5:] == [{1}] * 3
    assert label_sets[4] == {0, 1}


def test_heterogeneity_zero_is_iid() -> None:
    parts = partition.by_heterogeneity(LABELS, 4, 0.0, seed=0)
    for p in parts:
        assert abs(LABELS[p].mean() - 0.4) < 0.1


def test_heterogeneity_fraction_is_label_sorted() -> None:
    # h = 0.5: 500 iid (~60/40 split over 8 clients), 500 sorted: 300 zeros then 200 ones
    parts = partition.by_heterogeneity(LABELS, 8, 0.5, seed=1)
    share_of_one = [LABELS[p].mean() for p in parts]
    assert share_of_one[0] < 0.3 and share_of_one[-1] > 0.6  # skew follows client order
    assert share_of_one == sorted(share_of_one) or max(share_of_one) - min(share_of_one) > 0.4


def test_partitions_are_deterministic_in_the_seed() -> None:
    a = partition.by_heterogeneity(LABELS, 5, 0.7, seed=3)
    b = partition.by_heterogeneity(LABELS, 5, 0.7, seed=3)
    c = partition.by_heterogeneity(LABELS, 5, 0.7, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_uses_the_same_proportions_for_train_and_test() -> None:
    props = partition.dirichlet_proportions(2, 4, alpha=0.3, seed=0)
    np.testing.assert_allclose(props.sum(axis=1), 1.0)
    train = partition.by_proportions(LABELS, props, seed=0)
    np.testing.assert_array_equal(_all(train), np.arange(1000))
    test_labels = np.repeat([0, 1], [300, 200])
    test = partition.by_proportions(test_labels, props, seed=1)
    for client in range(4):
        for label, count_train, count_test in ((0, 600, 300), (1, 400, 200)):
            share_train = (LABELS[train[client]] == label).sum() / count_train
            share_test = (test_labels[test[client]] == label).sum() / count_test
            assert abs(share_train - props[label, client]) < 0.01
            assert abs(share_test - props[label, client]) < 0.01


def test_key_partition_keeps_every_key_on_one_client() -> None:
    keys_train = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"] * 2)
    keys_test = np.array(["a", "b", "d", "e"])
    owner = partition.key_assignment(keys_train, keys_test, 2, seed=0)
    assert set(owner) == {"a", "b", "c", "d", "e"}
    train = partition.by_key(keys_train, owner, 2)
    np.testing.assert_array_equal(_all(train), np.arange(12))
    clients_of_key = {k: {c for c, p in enumerate(train) if k in set(keys_train[p])} for k in "abcd"}
    assert all(len(c) == 1 for c in clients_of_key.values())
    # greedy on train+test counts a 6, b 4, d 3, c 2, e 1: {a, c} vs {b, d, e} (loads 8 and 8)
    assert owner["a"] == owner["c"] != owner["b"] == owner["d"] == owner["e"]
    assert sorted(len(p) for p in train) == [5, 7]
    with pytest.raises(ConfigError, match="distinct keys"):
        partition.key_assignment(keys_train, keys_test, 9, seed=0)


def _splits(n_train: int = 40, n_test: int = 16) -> TextSplits:
    def frame(n: int) -> pd.DataFrame:
        return pd.DataFrame({"text": [f"t{i}" for i in range(n)], "label": np.arange(n) % 2, "key": np.arange(n) % 4})

    return TextSplits(frame(n_train), frame(n_test), ["0", "1"])


def test_client_indices_split_train_and_test_alike() -> None:
    train, test = client_indices(_splits(), DataConfig(num_clients=2, heterogeneity=1.0), seed=0)
    assert set(_splits().train["label"].to_numpy()[train[0]]) == {0}
    assert set(_splits().test["label"].to_numpy()[test[0]]) == {0}
    assert set(_splits().test["label"].to_numpy()[test[1]]) == {1}


def test_more_clients_than_examples_is_an_error() -> None:
    with pytest.raises(ConfigError, match="larger than the number of training examples"):
        client_indices(_splits(5, 5), DataConfig(num_clients=6), seed=0)


def test_empty_client_is_an_error() -> None:
    with pytest.raises(ConfigError, match="client .* has no"):
        client_indices(_splits(40, 16), DataConfig(num_clients=4, partition="dirichlet", dirichlet_alpha=0.01), seed=0)
