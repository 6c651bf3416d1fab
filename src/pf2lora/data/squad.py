"""Extractive-QA sources: SQuAD v1.1 / v2.0 files, and ``squad`` / ``squad_v2`` by name (from
``data.path`` when it is given: a local copy, e.g. offline).

A file (``data.path``, ``data.test_path``) may be in either layout SQuAD is passed around in, told
apart by its content (Parquet by its extension or magic bytes), never by a setting:

- the official nested JSON: ``data[].title``, ``paragraphs[].context``,
  ``qas[].{id, question, answers[].{text, answer_start}}``, v2.0 also ``is_impossible``;
- the Hugging Face flat layout, one record per question, ``{id, title, context, question,
  answers: {text: [...], answer_start: [...]}}`` (an empty ``answers.text``: a v2 unanswerable
  question), as JSON (a top-level ``data`` list of records, or a top-level list), as JSON lines
  (what ``datasets``' ``to_json`` writes, whatever the file is called), or as Parquet.

Every source yields question frames with columns ``id``, ``title``, ``context``, ``question``,
``answer_texts``, ``answer_starts`` (lists; empty for a v2 unanswerable question), and the
partition columns the classification sources also have: ``label`` (the article title's index in
sorted order, so ``partition=heterogeneity`` deals titles to clients as it deals labels) and
``key`` (the title, for ``partition=key``). Train and test are split by question, 80/20 of the
file by default (the paper's split of SQuAD's training set), before any partitioning. Anything
malformed (a missing field, answer texts and starts of different lengths, an answer running past
its context) is one line of :class:`ConfigError` naming the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pf2lora.config import ConfigError, DataConfig
from pf2lora.data.sources import TextSplits, _hf, _split, _subsample, keyed_splits

HUB = ("squad", "squad_v2")
FLAT = ("id", "title", "context", "question", "answers")  # a flat record's fields
_PARQUET_MAGIC = b"PAR1"


def read_squad_file(path: str) -> pd.DataFrame:
    """The questions of a SQuAD file in any layout of the module docstring."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {path} does not exist")
    if _is_parquet(p):
        return _read_parquet(p, path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read SQuAD file {path}: {str(err).splitlines()[0]}") from None
    if not text.strip():
        raise ConfigError(f"{path} holds no questions")
    try:
        root = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise ConfigError(f"cannot read SQuAD file {path}: {str(err).splitlines()[0]}") from None
        # more than one JSON value: JSON lines, whatever the file's name
        return _frame(_flat_rows(_json_lines(text, path), path), path)
    if isinstance(root, list):  # a top-level list of flat records
        return _frame(_flat_rows(((f"[{i}]", r) for i, r in enumerate(root)), path), path)
    if isinstance(root, dict) and "data" not in root and _looks_flat(root):  # one line of JSON lines
        return _frame(_flat_rows([("line 1", root)], path), path)
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise ConfigError(f"{path} is not a SQuAD file: no top-level 'data' list of articles")
    if root["data"] and _looks_flat(root["data"][0]):
        return _frame(_flat_rows(((f"data[{i}]", r) for i, r in enumerate(root["data"])), path), path)
    return _read_nested(root["data"], path)


read_squad_json = read_squad_file  # the name from when only the official JSON was read


def _is_parquet(p: Path) -> bool:
    if p.suffix.lower() == ".parquet":
        return True
    try:
        with p.open("rb") as fh:
            return fh.read(4) == _PARQUET_MAGIC
    except OSError:
        return False


def _looks_flat(record: Any) -> bool:
    """A flat record (a question with its context), not a nested article (with ``paragraphs``)."""
    return isinstance(record, dict) and "paragraphs" not in record and any(k in record for k in FLAT if k != "title")


def _read_nested(articles: list, path: str) -> pd.DataFrame:
    """The official nested layout: ``data[].paragraphs[].qas[]``."""
    rows = []
    for a, article in enumerate(articles):
        where = f"{path}: data[{a}]"
        _need(article, ("title", "paragraphs"), where)
        for p_i, paragraph in enumerate(article["paragraphs"]):
            _need(paragraph, ("context", "qas"), f"{where}.paragraphs[{p_i}]")
            for q_i, qa in enumerate(paragraph["qas"]):
                at = f"{where}.paragraphs[{p_i}].qas[{q_i}]"
                _need(qa, ("id", "question", "answers"), at)
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else qa["answers"]
                for ans in answers:
                    _need(ans, ("text", "answer_start"), f"{at}.answers")
                rows.append(_row(article["title"], paragraph["context"], qa, answers, at))
    return _frame(rows, path)


def _json_lines(text: str, path: str) -> Iterator[tuple[str, Any]]:
    """(``line N``, record) of each non-blank line."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"cannot read SQuAD file {path}: line {n}: {str(err).splitlines()[0]}") from None


def _read_parquet(p: Path, path: str) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(p)
    except Exception as err:  # pyarrow's errors have no common base
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read SQuAD file {path}: {first}") from None
    missing = [c for c in FLAT if c not in frame.columns]
    if missing:
        raise ConfigError(
            f"{path} has no column {', '.join(repr(c) for c in missing)} (a SQuAD Parquet file has {', '.join(FLAT)})"
        )
    records = frame.to_dict("records")
    return _frame(_flat_rows(((f"row {i}", r) for i, r in enumerate(records)), path), path)


def _flat_rows(records: Iterable[tuple[str, Any]], source: str) -> list[dict[str, Any]]:
    """The rows of flat records (``(where, record)`` pairs), each checked: its fields, its answers'
    texts and starts of one length, every answer inside its context."""
    rows = []
    for where, record in records:
        at = f"{source}: {where}"
        if not isinstance(record, dict):
            raise ConfigError(f"{at} is not a question record (not a SQuAD file?)")
        missing = [k for k in FLAT if k not in record or _absent(record[k])]
        if missing:
            named = f" (id {record['id']!r})" if "id" in record and not _absent(record["id"]) else ""
            raise ConfigError(f"{at}{named} has no {', '.join(repr(k) for k in missing)} (not a SQuAD file?)")
        at = f"{at} (id {record['id']!r})"
        answers = [] if _true(record.get("is_impossible")) else _flat_answers(record["answers"], at)
        rows.append(_row(record["title"], record["context"], record, answers, at))
    return rows


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _true(value: Any) -> bool:
    return not _absent(value) and bool(value)


def _flat_answers(answers: Any, where: str) -> list[dict[str, Any]]:
    """``{text: [...], answer_start: [...]}`` (or a list of ``{text, answer_start}``) as a list of
    ``{text, answer_start}``."""
    if isinstance(answers, list | tuple | np.ndarray):  # the nested layout's form, in a flat record
        for ans in answers:
            _need(ans, ("text", "answer_start"), f"{where}.answers")
        return list(answers)
    _need(answers, ("text", "answer_start"), f"{where}.answers")
    texts, starts = answers["text"], answers["answer_start"]
    if not isinstance(texts, list | tuple | np.ndarray) or not isinstance(starts, list | tuple | np.ndarray):
        raise ConfigError(f"{where}: answers.text and answers.answer_start must be lists")
    if len(texts) != len(starts):
        raise ConfigError(
            f"{where}: answers has {len(texts)} text{'s' * (len(texts) != 1)} "
            f"but {len(starts)} answer_start{'s' * (len(starts) != 1)}"
        )
    return [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]


def _frame(rows: list[dict[str, Any]], path: str) -> pd.DataFrame:
    if not rows:
        raise ConfigError(f"{path} holds no questions")
    return pd.DataFrame(rows)


def _need(obj: Any, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ConfigError(f"{where} has no {', '.join(repr(k) for k in missing)} (not a SQuAD file?)")


def _row(title: str, context: str, qa: dict, answers: list[dict], where: str) -> dict[str, Any]:
    try:
        texts, starts = [str(a["text"]) for a in answers], [int(a["answer_start"]) for a in answers]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: an answer_start is not a whole number") from None
    for text, start in zip(texts, starts, strict=True):
        if start < 0 or start + len(text) > len(context):
            raise ConfigError(
                f"{where}: answer {text[:40]!r} at offset {start} runs past its context ({len(context)} characters)"
            )
    return {
        "id": str(qa["id"]),
        "title": str(title),
        "context": str(context),
        "question": str(qa["question"]),
        "answer_texts": texts,
        "answer_starts": starts,
    }


def _from_hub(name: str) -> pd.DataFrame:
    """``squad`` / ``squad_v2`` from the Hub: its training split (the paper splits it 80/20)."""
    records = _hf(name, None)["train"].to_dict("records")
    return _frame(_flat_rows(((f"record {i}", r) for i, r in enumerate(records)), name), name)


def load_squad(cfg: DataConfig, seed: int) -> TextSplits:
    """Train and test question frames for ``cfg`` (see the module docstring); the label names are
    the article titles."""
    if cfg.dataset == "file" or (cfg.dataset in HUB and cfg.path):  # squad/squad_v2: a local copy
        train = read_squad_file(cfg.path or "")
        test = read_squad_file(cfg.test_path) if cfg.test_path else None
    elif cfg.dataset in HUB:
        train, test = _from_hub(cfg.dataset), None
    else:
        raise ConfigError(f"unknown dataset {cfg.dataset!r} for task.name=qa (choose from {', '.join(HUB)}, file)")
    if test is None:
        train, test = _split(train, cfg.test_fraction, seed)
    train = _subsample(train, cfg.max_examples, seed)
    test = _subsample(test, cfg.max_test_examples, seed + 1)
    for frame in (train, test):
        frame["key"] = frame["title"]
    return keyed_splits(train, test)
