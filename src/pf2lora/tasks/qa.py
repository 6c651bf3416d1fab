"""Extractive question answering (the paper's SQuAD experiment, its Section 6.1.2 and Table 2).

An encoder with a span head (``qa_outputs``: a start and an end logit per token), shared or
personal like the classifier. Contexts longer than ``model.max_length`` are split into windows
that overlap by ``task.stride`` tokens; a window whose context part does not hold the whole answer
is labelled no-answer (start = end = the [CLS] position), as is an unanswerable v2 question. The
loss is the mean of the start and end cross-entropies. A client evaluates by decoding each of its
questions across all of the question's windows (the ``task.n_best`` best starts and ends of each
window, spans inside the context of at most ``task.max_answer_length`` tokens, scored by start +
end logit); for SQuAD v2 the best span is answered only where it beats the no-answer score
(start + end logit at [CLS], the lowest over the windows) by more than ``task.null_threshold``.
Exact match and F1 follow the official evaluation scripts (:mod:`pf2lora.tasks.squad_metrics`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from pf2lora.config import ConfigError, ExperimentConfig, TaskConfig
from pf2lora.data.squad import load_squad
from pf2lora.data.text import FederatedData, client_splits, lazy_clients, pad
from pf2lora.tasks.base import Batch, Forward, Task, token_batches
from pf2lora.tasks.squad_metrics import exact_match, f1_score
from pf2lora.utils import write_jsonl


class QAData:
    """The windows of one client's questions: token ids, the answer's token span per window, and
    for evaluation each window's question and character offsets (None outside the context)."""

    def __init__(
        self,
        ids: list[list[int]],
        types: list[list[int]] | None,
        starts: np.ndarray,
        ends: np.ndarray,
        question: np.ndarray,
        offsets: list[list[tuple[int, int] | None]],
        cls: np.ndarray,
        questions: pd.DataFrame,
        pad_id: int,
    ) -> None:
        self.ids, self.types, self.offsets, self.pad_id = ids, types, offsets, pad_id
        self.cls = np.asarray(cls, dtype=np.int64)  # the [CLS] position: the no-answer label
        self.starts, self.ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        self.question = np.asarray(question, dtype=np.int64)  # window -> row of ``questions``
        self.questions = questions.reset_index(drop=True)  # id, context, answer_texts, ...

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_questions(self) -> int:
        return len(self.questions)

    @classmethod
    def pool(cls, parts: list[QAData]) -> QAData:
        """Every part's windows and questions, in order (centralized training)."""
        shift = np.cumsum([0] + [p.num_questions for p in parts[:-1]])
        with_types = all(p.types is not None for p in parts)
        return cls(
            [row for p in parts for row in p.ids],
            [row for p in parts for row in p.types] if with_types else None,  # type: ignore[union-attr]
            np.concatenate([p.starts for p in parts]),
            np.concatenate([p.ends for p in parts]),
            np.concatenate([p.question + s for p, s in zip(parts, shift, strict=True)]),
            [row for p in parts for row in p.offsets],
            np.concatenate([p.cls for p in parts]),
            pd.concat([p.questions for p in parts], ignore_index=True),
            parts[0].pad_id,
        )

    def batch(self, indices: list[int], device: torch.device | None = None) -> dict[str, Tensor]:
        out = pad(self.ids, self.types, indices, self.pad_id)
        out["start_positions"] = torch.as_tensor(self.starts[indices])
        out["end_positions"] = torch.as_tensor(self.ends[indices])
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def windows(questions: pd.DataFrame, tokenizer: Any, max_length: int, stride: int) -> QAData:
    """Every question's windows over its context, labelled with the first answer's token span
    (the [CLS] position where the window does not hold the whole answer, or there is none)."""
    try:
        enc = tokenizer(
            [q.lstrip() for q in questions["question"]],
            questions["context"].tolist(),
            truncation="only_second",
            max_length=max_length,
            stride=stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
    except BaseException as err:  # e.g. a question longer than max_length - stride
        # the Rust tokenizer's panic (pyo3's PanicException) is not an Exception
        if not isinstance(err, Exception) and type(err).__name__ != "PanicException":
            raise
        raise ConfigError(
            f"cannot split the contexts into windows of {max_length} tokens with stride {stride}: "
            f"{str(err).splitlines()[0][:160]} (raise model.max_length or lower task.stride)"
        ) from None
    starts, ends, offsets, cls_positions = [], [], [], []
    for w, ids in enumerate(enc["input_ids"]):
        q = enc["overflow_to_sample_mapping"][w]
        sequence = enc.sequence_ids(w)
        offsets.append([tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], sequence, strict=True)])
        cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
        cls_positions.append(cls)
        texts, chars = questions["answer_texts"].iloc[q], questions["answer_starts"].iloc[q]
        span = _token_span(offsets[-1], chars[0], chars[0] + len(texts[0])) if len(texts) else None
        starts.append(span[0] if span else cls)
        ends.append(span[1] if span else cls)
    types = enc.get("token_type_ids")
    return QAData(
        enc["input_ids"],
        types,
        np.array(starts),
        np.array(ends),
        np.array(enc["overflow_to_sample_mapping"]),
        offsets,
        np.array(cls_positions),
        questions,
        tokenizer.pad_token_id or 0,
    )


def check_windows(questions: pd.DataFrame, tokenizer: Any, max_length: int, stride: int) -> None:
    """Refuse, before any work, a question whose windows cannot be cut: one that leaves no more than
    ``stride`` of the ``max_length`` tokens for a context too long to fit (the tokenizer panics on
    it). Only the questions are tokenized here; the few that leave so little room are windowed."""
    if not len(questions):
        return
    texts = [q.lstrip() for q in questions["question"]]
    lengths = np.array([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    room = max_length - tokenizer.num_special_tokens_to_add(pair=True) - lengths
    for row in np.flatnonzero(room <= stride):
        try:
            windows(questions.iloc[[row]], tokenizer, max_length, stride)
        except ConfigError:
            raise ConfigError(
                f"question {questions['id'].iloc[row]!r} takes {lengths[row]} tokens and leaves {room[row]} of "
                f"model.max_length ({max_length}) for its context, which needs more than task.stride ({stride}) "
                "to be cut into windows: raise model.max_length or lower task.stride"
            ) from None


def _token_span(offsets: list[tuple[int, int] | None], start: int, end: int) -> tuple[int, int] | None:
    """The first and last context token of characters [start, end), or None if the window's
    context does not cover them all."""
    inside = [i for i, o in enumerate(offsets) if o is not None]
    if not inside or offsets[inside[0]][0] > start or offsets[inside[-1]][1] < end:  # type: ignore[index]
        return None
    first = next(i for i in inside if offsets[i][1] > start)  # type: ignore[index]
    last = next(i for i in reversed(inside) if offsets[i][0] < end)  # type: ignore[index]
    return first, last


def decode(
    start: list[np.ndarray],
    end: list[np.ndarray],
    offsets: list[list[tuple[int, int] | None]],
    context: str,
    cls: list[int],
    n_best: int,
    max_answer_length: int,
    no_answer: bool,
    null_threshold: float = 0.0,
) -> str:
    """One question's answer from the logits of its windows: the best-scoring span (start + end
    logit) among each window's ``n_best`` starts and ends, inside the context, end >= start, at
    most ``max_answer_length`` tokens. With ``no_answer`` (SQuAD v2), the empty answer where the
    lowest no-answer score over the windows beats the best span by more than ``null_threshold``."""
    best_score, best_text = -np.inf, ""
    null = min(float(s[c] + e[c]) for s, e, c in zip(start, end, cls, strict=True))
    for s_logits, e_logits, offs in zip(start, end, offsets, strict=True):
        tops = np.argsort(s_logits)[::-1][:n_best]
        tope = np.argsort(e_logits)[::-1][:n_best]
        for i in tops:
            for j in tope:
                if offs[i] is None or offs[j] is None or j < i or j - i + 1 > max_answer_length:
                    continue
                score = float(s_logits[i] + e_logits[j])
                if score > best_score:
                    best_score, best_text = score, context[offs[i][0] : offs[j][1]]  # type: ignore[index]
    if no_answer and (best_score == -np.inf or null - best_score > null_threshold):
        return ""
    return best_text


class QuestionAnswering(Task):
    name = "qa"
    metrics = ("f1", "exact_match")
    primary = "f1"
    head_candidates = ("qa_outputs",)

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg

    @classmethod
    def build(cls, cfg: ExperimentConfig, tokenizer: Any) -> tuple[QuestionAnswering, FederatedData]:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"task.name=qa needs a tokenizer with offset mapping (a fast tokenizer); {cfg.model.name}'s has none"
            )
        splits = load_squad(cfg.data, cfg.seed)
        unanswerable = sum(len(a) == 0 for a in pd.concat([splits.train, splits.test])["answer_texts"])
        if unanswerable and cfg.task.version == 1:
            raise ConfigError(f"the data holds {unanswerable} unanswerable (SQuAD v2) questions; set task.version=2")
        # validation questions held out by context: none shares its paragraph with a training question
        rows = client_splits(splits, cfg.data, cfg.seed, groups="context")
        stride = cfg.task.stride if cfg.task.stride is not None else cfg.model.max_length // 4
        for frame in (splits.train, splits.test):
            check_windows(frame, tokenizer, cfg.model.max_length, stride)
        # each client's windows are cut when its data is first used (a site: its own questions only)
        encode = partial(windows, tokenizer=tokenizer, max_length=cfg.model.max_length, stride=stride)
        return cls(cfg.task), lazy_clients(splits, rows, encode)

    def load_model(self, name: str, dropout: float | None = None) -> nn.Module:
        from transformers import AutoModelForQuestionAnswering

        from pf2lora.models import load_pretrained

        return load_pretrained(AutoModelForQuestionAnswering, name, dropout)

    def loss(self, outputs: Any, batch: Batch, reduction: str = "mean") -> Tensor:
        """(CE(start) + CE(end)) / 2 per window, over the window's tokens."""
        start, end = outputs.start_logits.float(), outputs.end_logits.float()
        ce = nn.functional.cross_entropy
        return (
            ce(start, batch["start_positions"], reduction=reduction)
            + ce(end, batch["end_positions"], reduction=reduction)
        ) / 2

    @torch.no_grad()
    def evaluate(
        self, forward: Forward, data: QAData, batch_size: int, device: torch.device, record: Path | None = None
    ) -> dict[str, float]:
        """Every window's logits (kept on the client), each question decoded across its windows,
        then the mean exact match and F1 over the client's questions. ``record``: a JSON-lines file
        of each question's id, predicted answer and reference answers."""
        total = 0.0
        starts = [np.empty(0)] * len(data)
        ends = [np.empty(0)] * len(data)
        for indices in token_batches([len(i) for i in data.ids], self.cfg.eval_tokens, max_items=batch_size):
            batch = data.batch(indices, device)
            outputs = forward(batch)
            total += self.loss(outputs, batch, reduction="sum").item()
            for row, w in enumerate(indices):
                n = len(data.ids[w])
                starts[w] = outputs.start_logits[row, :n].float().cpu().numpy()
                ends[w] = outputs.end_logits[row, :n].float().cpu().numpy()
        by_question: dict[int, list[int]] = {}
        for w, q in enumerate(data.question):
            by_question.setdefault(int(q), []).append(w)
        em = f1 = 0.0
        v2 = self.cfg.version == 2
        predictions = []
        for q, row in enumerate(data.questions.itertuples()):
            ws = by_question.get(q, [])
            prediction = decode(
                [starts[w] for w in ws],
                [ends[w] for w in ws],
                [data.offsets[w] for w in ws],
                row.context,
                [int(data.cls[w]) for w in ws],
                self.cfg.n_best,
                self.cfg.max_answer_length,
                v2,
                self.cfg.null_threshold,
            )
            em += exact_match(prediction, row.answer_texts, v2)
            f1 += f1_score(prediction, row.answer_texts, v2)
            predictions.append({"id": row.id, "prediction": prediction, "answers": list(row.answer_texts)})
        if record is not None:
            write_jsonl(record, predictions)
        n = data.num_questions
        return {"f1": f1 / n, "exact_match": em / n, "loss": total / max(len(data), 1), "num_examples": n}
