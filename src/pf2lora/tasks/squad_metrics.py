"""Exact match and F1 of SQuAD's official evaluation scripts (v1.1 and v2.0), per question.

Written out here because the official scripts are not a package (``evaluate`` fetches them from
the Hub at run time, which our machines cannot reach), and the rules are a few lines: answers are
normalised (lower case, punctuation removed, the articles a / an / the removed, whitespace
collapsed); a question scores the best over its reference answers. Under v2.0 an unanswerable
question's only reference is the empty answer, so it scores 1 only for an empty prediction, and
an empty prediction or reference has F1 1 only when both are empty.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the scripts' ``normalize_answer``)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, reference: str, v2: bool) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if v2 and (not pred or not ref):
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _references(references: list[str], v2: bool) -> list[str]:
    """v2.0 drops references that normalise to nothing and reads none left as [""] (unanswerable)."""
    if not v2:
        return list(references)
    return [r for r in references if normalize_answer(r)] or [""]


def exact_match(prediction: str, references: list[str], v2: bool = False) -> float:
    """1.0 if the normalised prediction equals a normalised reference."""
    refs = _references(references, v2)
    return max((float(normalize_answer(prediction) == normalize_answer(r)) for r in refs), default=0.0)


def f1_score(prediction: str, references: list[str], v2: bool = False) -> float:
    """The best token-level F1 over the references."""
    refs = _references(references, v2)
    return max((_f1(prediction, r, v2) for r in refs), default=0.0)
