"""Data sources: bundled corpora, the user's own files, and their errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pf2lora.config import ConfigError, DataConfig
from pf2lora.data.sources import load_bbc_news, load_rotten_tomatoes, load_splits


def _frame(n: int = 30) -> pd.DataFrame:
    return pd.DataFrame({"review": [f"text {i}" for i in range(n)], "stars": ["good", "bad", "ok"] * (n // 3)})


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_user_files_with_named_columns(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    frame = _frame()
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    cfg = DataConfig(dataset="file", path=str(path), text_column="review", label_column="stars", test_fraction=0.2)
    splits = load_splits(cfg, seed=0)
    assert len(splits.train) == 24 and len(splits.test) == 6
    assert splits.label_names == ["bad", "good", "ok"]
    assert set(splits.train["label"]) <= {0, 1, 2}
    assert set(splits.train["text"]) | set(splits.test["text"]) == set(frame["review"])


def test_separate_test_file(tmp_path: Path) -> None:
    _frame(30).to_csv(tmp_path / "train.csv", index=False)
    _frame(9).to_csv(tmp_path / "test.csv", index=False)
    cfg = DataConfig(
        dataset="file",
        path=str(tmp_path / "train.csv"),
        test_path=str(tmp_path / "test.csv"),
        text_column="review",
        label_column="stars",
    )
    splits = load_splits(cfg, seed=0)
    assert (len(splits.train), len(splits.test)) == (30, 9)


def test_missing_column_names_it(tmp_path: Path) -> None:
    _frame().to_csv(tmp_path / "d.csv", index=False)
    cfg = DataConfig(dataset="file", path=str(tmp_path / "d.csv"), text_column="body", label_column="stars")
    with pytest.raises(ConfigError, match="no text column 'body'.*columns: review, stars"):
        load_splits(cfg, seed=0)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_splits(DataConfig(dataset="file", path=str(tmp_path / "none.csv")), seed=0)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not a parquet file")
    with pytest.raises(ConfigError, match="cannot read data file"):
        load_splits(DataConfig(dataset="file", path=str(broken)), seed=0)
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(ConfigError, match="unsupported format"):
        load_splits(DataConfig(dataset="file", path=str(odd)), seed=0)


def test_unknown_dataset_and_offline_hub() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'imdbx'"):
        load_splits(DataConfig(dataset="imdbx"), seed=0)
    with pytest.raises(ConfigError, match="cannot load dataset glue:sst2 from the Hugging Face Hub"):
        load_splits(DataConfig(dataset="sst2"), seed=0)  # tests run with HF_HUB_OFFLINE=1


def test_bundled_corpora() -> None:
    rt = load_rotten_tomatoes()
    assert len(rt) == 12808 and set(rt["label"]) == {"fresh", "rotten"}
    assert rt["key"].nunique() == 508
    bbc = load_bbc_news()
    assert len(bbc) == 2225 and bbc["label"].nunique() == 5


def test_subsampling_is_seeded() -> None:
    cfg = DataConfig(dataset="rotten_tomatoes", max_examples=500, max_test_examples=100)
    a, b = load_splits(cfg, seed=1), load_splits(cfg, seed=1)
    assert len(a.train) == 500 and len(a.test) == 100
    assert a.train["text"].tolist() == b.train["text"].tolist()


def test_hugging_face_datasets_path_with_a_local_dataset_folder(tmp_path: Path) -> None:
    # `datasets.load_dataset(folder)` is the same call that loads a Hub dataset by name
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pd.DataFrame({"text": [f"a{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}).to_csv(
        folder / "train.csv", index=False
    )
    pd.DataFrame({"text": ["b1", "b2", "b3"], "label": [0, 1, 1]}).to_csv(folder / "test.csv", index=False)
    splits = load_splits(DataConfig(dataset=f"hf:{folder}"), seed=0)
    assert (len(splits.train), len(splits.test)) == (20, 3)
    assert splits.label_names == ["0", "1"]


def test_numeric_labels_keep_numeric_order_and_pairs_load(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": ["x"] * 12, "b": ["y"] * 12, "label": [2, 10, 1] * 4})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    cfg = DataConfig(dataset="file", path=str(tmp_path / "pairs.csv"), text_column="a", text_pair_column="b")
    splits = load_splits(cfg, seed=0)
    assert splits.label_names == ["1", "2", "10"]
    assert set(splits.train["text_pair"]) == {"y"}
    from pf2lora.data.text import tokenize
    from pf2lora.models import load_tokenizer

    batch = tokenize(splits.train, load_tokenizer("bundled"), 16).batch([0, 1])
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1]  # [CLS] x [SEP] y [SEP]


@pytest.mark.parametrize("pairs", [False, True])
def test_clients_tokenized_when_first_used_match_the_split_tokenized_at_once(tmp_path: Path, pairs: bool) -> None:
    from pf2lora.data.text import build_federated_data, client_indices, tokenize
    from pf2lora.models import load_tokenizer

    words = ["alpha beta", "gamma delta epsilon " * 9, "zeta", "eta theta iota kappa " * 4]
    frame = pd.DataFrame({"a": words * 10, "b": list(reversed(words)) * 10, "label": [0, 1, 2, 1, 0] * 8})
    frame.to_csv(tmp_path / "d.csv", index=False)
    pair = {"text_pair_column": "b"} if pairs else {}
    cfg = DataConfig(dataset="file", path=str(tmp_path / "d.csv"), text_column="a", num_clients=3, **pair)
    tokenizer = load_tokenizer("bundled")
    data = build_federated_data(cfg, tokenizer, 12, seed=0)
    assert not data.train._done and not data.test._done  # nothing tokenized yet
    splits = load_splits(cfg, seed=0)
    train_idx, test_idx = client_indices(splits, cfg, 0)
    assert len(data.train) == len(train_idx) == 3
    whole = tokenize(splits.train, tokenizer, 12)
    client = data.train[1]
    assert set(data.train._done) == {1}  # only the client asked for
    expected = whole.subset(train_idx[1])
    assert client.ids == expected.ids and client.types == expected.types
    assert client.labels.tolist() == expected.labels.tolist()
    assert data.train[-1] is data.train[2] and [len(c) for c in data.train] == [len(i) for i in train_idx]
    with pytest.raises(IndexError):
        data.train[3]
