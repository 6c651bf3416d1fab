"""Data-to-text sources for the generation task: E2E NLG, WebNLG and a user's own file.

Every source yields one row per *input* with the columns ``source`` (the input, linearised into
text), ``references`` (every reference text of that input) and ``key`` (what a natural partition
groups by: the E2E restaurant name, the WebNLG category, or the user's key column). Training uses
every (input, reference) pair; evaluation generates once per input and scores against all its
references, as the E2E and WebNLG challenges do.

- E2E: the official CSV (``mr``, ``ref``; one row per reference, an MR on several rows), or
  ``e2e_nlg`` from the Hub. ``name[The Eagle], eatType[coffee shop]`` becomes
  ``name : The Eagle | eatType : coffee shop``.
- WebNLG: the Hugging Face ``web_nlg`` fields as JSON lines (``category``,
  ``modified_triple_sets.mtriple_set``, ``lex.text``), the official XML release (``<entry
  category=...>`` with ``<mtriple>`` and ``<lex>``), or ``web_nlg`` from the Hub. Triples
  ``s | p | o`` are joined with `` ; ``. An entry without modified triples (the enriched v2.0
  release's test set has only the original DBpedia ones) falls back to its original triples, with
  language tags and datatypes dropped as the modified sets do.
- ``file``: CSV / JSON lines / Parquet with a source and a target column (``data.text_column``,
  default ``source``; ``data.target_column``, default ``target``) and an optional key column; rows
  with the same source are one input with several references.

Several files can be pooled with commas in ``data.path`` (E2E's dev and test sets: their
restaurants are disjoint, so a split that keeps each client's test restaurants inside its
training restaurants must pool them and split per restaurant).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd

from pf2lora.config import ConfigError, DataConfig
from pf2lora.data.sources import TextSplits, _hf, _subsample, keyed_splits, read_table

HUB = ("e2e_nlg", "web_nlg")
DATASETS = ("e2e", "webnlg", "file", *HUB)
_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*,?")
_LANG_TAG = re.compile(r'"@[A-Za-z-]+$')
_TYPED_LITERAL = re.compile(r'"([^"]*)"\^\^\S+$')


def linearise_mr(mr: str) -> str:
    """An E2E meaning representation as ``slot : value | slot : value``."""
    items = _MR_ITEM.findall(mr)
    if not items:
        raise ConfigError(f"cannot read E2E meaning representation {mr[:60]!r} (expected slot[value], ...)")
    return " | ".join(f"{slot} : {value}" for slot, value in items)


def mr_name(mr: str) -> str:
    """The restaurant name of an E2E meaning representation ('' where it has none)."""
    found = dict(_MR_ITEM.findall(mr))
    return found.get("name", "")


def linearise_triples(triples: list[str]) -> str:
    """WebNLG triples ``subject | predicate | object`` joined with `` ; `` (underscores as spaces)."""
    return " ; ".join(t.replace("_", " ").strip() for t in triples)


def _grouped(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (key, source) with every reference of that input, in first-seen order."""
    frame = frame.dropna(subset=["source", "target"])
    grouped = frame.groupby(["key", "source"], sort=False)["target"].agg(list).reset_index()
    return grouped.rename(columns={"target": "references"})[["source", "references", "key"]]


def _files(path: str) -> list[Path]:
    files = [Path(p.strip()) for p in path.split(",") if p.strip()]
    for f in files:
        if not f.is_file():
            raise ConfigError(f"data file {f} does not exist")
    if not files:
        raise ConfigError("data.path names no file")
    return files


def read_e2e_csv(path: Path) -> pd.DataFrame:
    return read_e2e_csv_frame(read_table(str(path)), str(path))


def read_e2e_csv_frame(frame: pd.DataFrame, where: str = "the E2E data") -> pd.DataFrame:
    """Rows of the official E2E CSV (``mr``, ``ref``) as source / target / key (restaurant name)."""
    missing = [c for c in ("mr", "ref") if c not in frame.columns]
    if missing:
        raise ConfigError(f"{where} has no column {', '.join(repr(c) for c in missing)} (not an E2E CSV?)")
    mr = frame["mr"].astype(str)
    return pd.DataFrame({"source": mr.map(linearise_mr), "target": frame["ref"], "key": mr.map(mr_name)})


def original_triple(triple: str) -> str:
    """An original (DBpedia) triple in the modified sets' form: a language tag dropped
    (``"Aarhus, Denmark"@en`` -> ``"Aarhus, Denmark"``), a typed literal unquoted
    (``"25.0"^^xsd:double`` -> ``25.0``)."""
    triple = _LANG_TAG.sub('"', triple.strip())
    return _TYPED_LITERAL.sub(r"\1", triple)


def _triples(entry: dict) -> list[str]:
    """An entry's modified triples; where that set is empty (the enriched release's test entries
    carry only their original triples), the original triples in the same form."""
    triples = [t for t in entry["modified_triple_sets"]["mtriple_set"][0] if t and t.strip()]
    if not triples:
        original = (entry.get("original_triple_sets") or {}).get("otriple_set") or [[]]
        triples = [original_triple(t) for t in original[0] if t and t.strip()]
    return triples


def _webnlg_rows(entries: list[dict], where: str) -> pd.DataFrame:
    rows = []
    for i, entry in enumerate(entries):
        try:
            triples = _triples(entry)
            texts = entry["lex"]["text"]
            category = entry["category"]
        except (KeyError, IndexError, TypeError):
            raise ConfigError(
                f"{where}: entry {i + 1} lacks category, modified_triple_sets.mtriple_set or lex.text "
                "(not WebNLG in the web_nlg fields?)"
            ) from None
        if not triples:
            raise ConfigError(f"{where}: entry {i + 1} has no triples (neither modified nor original)")
        source = linearise_triples(triples)
        rows.extend({"source": source, "target": str(t), "key": str(category)} for t in texts)
    return pd.DataFrame(rows, columns=["source", "target", "key"])


def read_webnlg_jsonl(path: Path) -> pd.DataFrame:
    entries = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{path}:{n}: not JSON ({err.msg})") from None
    return _webnlg_rows(entries, str(path))


def read_webnlg_xml(path: Path) -> pd.DataFrame:
    """The official WebNLG XML: ``<entry category=...>`` with ``<modifiedtripleset><mtriple>`` and
    ``<lex>`` (its text, or in the enriched release its ``<text>`` child)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ConfigError(f"cannot read WebNLG XML {path}: {err}") from None
    entries = []
    for entry in root.iter("entry"):
        triples = [t.text or "" for t in entry.iter("mtriple")]
        original = [t.text or "" for t in entry.iter("otriple")]
        texts = []
        for lex in entry.iter("lex"):
            child = lex.find("text")
            text = child.text if child is not None else lex.text
            if text and text.strip():
                texts.append(" ".join(text.split()))
        entries.append(
            {
                "category": entry.get("category"),
                "modified_triple_sets": {"mtriple_set": [triples]},
                "original_triple_sets": {"otriple_set": [original]},
                "lex": {"text": texts},
            }
        )
    if not entries:
        raise ConfigError(f"{path} holds no <entry> (not a WebNLG XML file?)")
    return _webnlg_rows(entries, str(path))


def read_pairs(path: Path, cfg: DataConfig) -> pd.DataFrame:
    """A user's file: source and target columns, and a key column where given."""
    frame = read_table(str(path))
    source, target = cfg.text_column or "source", cfg.target_column or "target"
    missing = [c for c in (source, target, cfg.key_column) if c and c not in frame.columns]
    if missing:
        raise ConfigError(
            f"{path} has no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(map(str, frame.columns))}; "
            "set data.text_column, data.target_column, data.key_column)"
        )
    key = frame[cfg.key_column].astype(str) if cfg.key_column else pd.Series([""] * len(frame))
    return pd.DataFrame({"source": frame[source].astype(str), "target": frame[target], "key": key.to_numpy()})


def read_generation_file(path: Path, dataset: str, cfg: DataConfig) -> pd.DataFrame:
    if dataset in ("e2e", "e2e_nlg"):
        return read_e2e_csv(path)
    if dataset in ("webnlg", "web_nlg"):
        return read_webnlg_xml(path) if path.suffix.lower() == ".xml" else read_webnlg_jsonl(path)
    return read_pairs(path, cfg)


def _read(path: str, cfg: DataConfig) -> pd.DataFrame:
    return _grouped(pd.concat([read_generation_file(f, cfg.dataset, cfg) for f in _files(path)], ignore_index=True))


def _from_hub(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``e2e_nlg`` / ``web_nlg`` from the Hub: the training split, and the test split."""
    if name == "e2e_nlg":
        splits = _hf("e2e_nlg", None)

        def convert(frame: pd.DataFrame) -> pd.DataFrame:
            mr = frame["meaning_representation"].astype(str)
            return pd.DataFrame(
                {"source": mr.map(linearise_mr), "target": frame["human_reference"], "key": mr.map(mr_name)}
            )
    else:
        splits = _hf("web_nlg", "release_v3.0_en")

        def convert(frame: pd.DataFrame) -> pd.DataFrame:
            records = frame.to_dict("records")
            for r in records:  # the Hub gives numpy arrays where the JSON lines hold lists
                for field, inner in (("modified_triple_sets", "mtriple_set"), ("original_triple_sets", "otriple_set")):
                    sets = (r.get(field) or {}).get(inner)
                    r[field] = {inner: [list(sets[0]) if sets is not None and len(sets) else []]}
                r["lex"] = {"text": list(r["lex"]["text"])}
            return _webnlg_rows(records, "web_nlg")

    return _grouped(convert(splits["train"])), _grouped(convert(splits["test"]))


def split_within_keys(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train / test inputs with every test key also in training: each key's inputs are split by
    ``fraction`` (a key with one input stays in training)."""
    rng = np.random.default_rng(seed)
    train_rows, test_rows = [], []
    for _, rows in frame.groupby("key", sort=True).indices.items():
        rows = rng.permutation(rows)
        n_test = int(round(fraction * len(rows))) if len(rows) > 1 else 0
        n_test = min(n_test, len(rows) - 1)
        test_rows.extend(rows[:n_test])
        train_rows.extend(rows[n_test:])
    return frame.iloc[sorted(train_rows)].reset_index(drop=True), frame.iloc[sorted(test_rows)].reset_index(drop=True)


def load_generation(cfg: DataConfig, seed: int) -> TextSplits:
    """Train and test inputs for ``cfg``; each client's test keys lie within the training keys
    (test inputs whose key no training input has are dropped, e.g. WebNLG's unseen categories).
    ``label`` is the key's index (the heterogeneity partition sorts by it); label names are the keys."""
    if cfg.dataset not in DATASETS:
        choices = ", ".join(DATASETS)
        raise ConfigError(f"unknown dataset {cfg.dataset!r} for task.name=generation (choose from {choices})")
    if cfg.path:
        train = _read(cfg.path, cfg)
        test = _read(cfg.test_path, cfg) if cfg.test_path else None
    elif cfg.dataset in HUB:
        train, test = _from_hub(cfg.dataset)
    else:
        raise ConfigError(f"data.dataset={cfg.dataset} needs data.path (or use {' / '.join(HUB)} from the Hub)")
    if test is None:
        train, test = split_within_keys(train, cfg.test_fraction, seed)
    else:
        test = test[test["key"].isin(set(train["key"]))].reset_index(drop=True)
    if len(train) == 0 or len(test) == 0:
        raise ConfigError("the generation data has no training or no test inputs (test keys must appear in training)")
    train = _subsample(train, cfg.max_examples, seed)
    test = _subsample(test, cfg.max_test_examples, seed + 1)
    return keyed_splits(train, test)
