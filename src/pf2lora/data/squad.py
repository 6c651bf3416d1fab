"""Extractive-QA sources: SQuAD v1.1 / v2.0 JSON files, and ``squad`` / ``squad_v2`` by name
(from ``data.path`` when it is given: a local copy of the official file, e.g. offline).

Every source yields question frames with columns ``id``, ``title``, ``context``, ``question``,
``answer_texts``, ``answer_starts`` (lists; empty for a v2 unanswerable question), and the
partition columns the classification sources also have: ``label`` (the article title's index in
sorted order, so ``partition=heterogeneity`` deals titles to clients as it deals labels) and
``key`` (the title, for ``partition=key``). Train and test are split by question, 80/20 of the
file by default (the paper's split of SQuAD's training set), before any partitioning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pf2lora.config import ConfigError, DataConfig
from pf2lora.data.sources import TextSplits, _hf, _split, _subsample, keyed_splits

HUB = ("squad", "squad_v2")


def read_squad_json(path: str) -> pd.DataFrame:
    """The questions of an official SQuAD JSON file (``data[].title``, ``paragraphs[].context``,
    ``qas[].{id, question, answers[].{text, answer_start}}``, v2.0 also ``is_impossible``)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data file {path} does not exist")
    try:
        root = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read SQuAD file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise ConfigError(f"{path} is not a SQuAD file: no top-level 'data' list of articles")
    rows = []
    for a, article in enumerate(root["data"]):
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
    if not rows:
        raise ConfigError(f"{path} holds no questions")
    return pd.DataFrame(rows)


def _need(obj: Any, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ConfigError(f"{where} has no {', '.join(repr(k) for k in missing)} (not a SQuAD file?)")


def _row(title: str, context: str, qa: dict, answers: list[dict], where: str) -> dict[str, Any]:
    texts, starts = [str(a["text"]) for a in answers], [int(a["answer_start"]) for a in answers]
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
    frame = _hf(name, None)["train"]
    rows = []
    for record in frame.to_dict("records"):
        answers = record["answers"]
        texts, starts = list(answers["text"]), [int(s) for s in answers["answer_start"]]
        qa = {"id": record["id"], "question": record["question"]}
        rows.append(
            _row(
                record["title"],
                record["context"],
                qa,
                [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)],
                f"{name} {record['id']}",
            )
        )
    return pd.DataFrame(rows)


def load_squad(cfg: DataConfig, seed: int) -> TextSplits:
    """Train and test question frames for ``cfg`` (see the module docstring); the label names are
    the article titles."""
    if cfg.dataset == "file" or (cfg.dataset in HUB and cfg.path):  # squad/squad_v2: a local copy
        train = read_squad_json(cfg.path or "")
        test = read_squad_json(cfg.test_path) if cfg.test_path else None
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
