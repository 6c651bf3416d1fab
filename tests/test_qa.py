"""Extractive QA: the official EM/F1 rules, the SQuAD file layouts (nested JSON; flat JSON, JSON
lines, Parquet), windows over long contexts, n-best decoding, the title partition, the PEFT export,
bad input, and (integration) a tiny run on both engines and a SQuAD v2 run from a flat file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import TINY_TRAIN
from peft import PeftModel

from pf2lora import compare
from pf2lora.adapters.export import PeftExporter
from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.cli import main
from pf2lora.config import ConfigError, TaskConfig, load_config
from pf2lora.data.squad import load_squad, read_squad_file, read_squad_json
from pf2lora.data.text import client_indices
from pf2lora.models import load_tokenizer
from pf2lora.tasks.qa import QuestionAnswering, check_windows, decode, windows
from pf2lora.tasks.squad_metrics import exact_match, f1_score, normalize_answer

REPO = Path(__file__).resolve().parent.parent
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _article(title: str, n_questions: int, words: int = 12, seed: int = 0) -> dict:
    """One article, one paragraph of ``words`` words; question i asks for word i (mod words)."""
    rng = np.random.default_rng(seed)
    context = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words))
    starts = np.cumsum([0] + [len(w) + 1 for w in context.split()])
    qas = []
    for i in range(n_questions):
        k = i % words
        text = context.split()[k]
        qas.append(
            {
                "id": f"{title}-{i}",
                "question": f"which word is number {k}?",
                "answers": [{"text": text, "answer_start": int(starts[k])}],
            }
        )
    return {"title": title, "paragraphs": [{"context": context, "qas": qas}]}


def _write(path: Path, articles: list[dict]) -> Path:
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    return path


def _v2_articles(n_articles: int = 3, n_questions: int = 6) -> list[dict]:
    """Nested v2 articles: every third question unanswerable (``is_impossible``, a plausible answer
    but no answers), the first question of each article with two references."""
    articles = [_article(f"title{t}", n_questions, seed=t) for t in range(n_articles)]
    for art in articles:
        qas = art["paragraphs"][0]["qas"]
        qas[0]["answers"].append(dict(qas[0]["answers"][0]))
        for qa in qas[2::3]:
            qa.update(is_impossible=True, plausible_answers=qa["answers"], answers=[])
    return articles


def _flat(articles: list[dict]) -> list[dict]:
    """The same questions in the Hugging Face flat layout (``answers: {text: [...], answer_start: [...]}``)."""
    return [
        {
            "id": qa["id"],
            "title": art["title"],
            "context": para["context"],
            "question": qa["question"],
            "answers": {
                "text": [a["text"] for a in qa["answers"]],
                "answer_start": [a["answer_start"] for a in qa["answers"]],
            },
        }
        for art in articles
        for para in art["paragraphs"]
        for qa in para["qas"]
    ]


def _write_layout(path: Path, records: list[dict], layout: str) -> Path:
    if layout == "flat-json":
        path.write_text(json.dumps({"version": "v2.0", "data": records}))
    elif layout == "flat-list":
        path.write_text(json.dumps(records))
    elif layout in ("flat-jsonl", "flat-jsonl-as-json"):
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        pd.DataFrame(records).to_parquet(path)
    return path


# ----------------------------------------------------------------------------- file layouts


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("flat-json", "train.json"),
        ("flat-list", "train.json"),
        ("flat-jsonl", "train.jsonl"),
        ("flat-jsonl-as-json", "train.json"),  # JSON lines under a .json name (datasets' to_json)
        ("flat-parquet", "train.parquet"),
        ("flat-parquet", "train-00000-of-00001"),  # Parquet told by its magic bytes
    ],
)
def test_every_squad_layout_reads_to_the_nested_files_frame(tmp_path: Path, layout: str, name: str) -> None:
    # Prepare: v2 questions (some unanswerable, some with two references) as the official nested JSON
    articles = _v2_articles()
    nested = read_squad_file(str(_write(tmp_path / "nested.json", articles)))
    assert sum(len(a) == 0 for a in nested["answer_texts"]) == 6 and len(nested) == 18
    assert nested["answer_texts"][0] == [nested["answer_texts"][0][0]] * 2
    # Execute: the same questions in a flat layout
    frame = read_squad_file(str(_write_layout(tmp_path / name, _flat(articles), layout)))
    # Assert: the same frame, column for column (lists of str / int, empty for unanswerable)
    pd.testing.assert_frame_equal(frame, nested)
    assert all(type(s) is int for starts in frame["answer_starts"] for s in starts)


def test_files_datasets_writes_read_as_the_official_json(tmp_path: Path) -> None:
    """What ``datasets`` itself writes (to_json: JSON lines; to_parquet), v1 and v2 questions."""
    datasets = pytest.importorskip("datasets")
    for articles in ([_article(f"title{t}", 4, seed=t) for t in range(2)], _v2_articles(2, 4)):
        nested = read_squad_file(str(_write(tmp_path / "nested.json", articles)))
        ds = datasets.Dataset.from_list(_flat(articles))
        ds.to_json(str(tmp_path / "train.json"))
        ds.to_parquet(str(tmp_path / "train.parquet"))
        for name in ("train.json", "train.parquet"):
            pd.testing.assert_frame_equal(read_squad_file(str(tmp_path / name)), nested)
    assert read_squad_json is read_squad_file  # the old name still reads every layout


def _flat_error(tmp_path: Path, records: list, layout: str = "flat-json", name: str = "bad.json") -> str:
    with pytest.raises(ConfigError) as err:
        read_squad_file(str(_write_layout(tmp_path / name, records, layout)))
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    return message


def test_bad_flat_records_are_one_line_naming_the_record(tmp_path: Path) -> None:
    good = _flat(_v2_articles(1, 3))
    no_context = [good[0], {k: v for k, v in good[1].items() if k != "context"}]
    message = _flat_error(tmp_path, no_context)
    assert "data[1] (id 'title0-1') has no 'context'" in message
    message = _flat_error(tmp_path, [good[0], {"title": "T", "context": "c"}], "flat-list")
    assert "[1] has no 'id', 'question', 'answers'" in message
    uneven = [good[0], {**good[1], "answers": {"text": ["a", "b"], "answer_start": [0]}}]
    message = _flat_error(tmp_path, uneven, "flat-jsonl", "bad.jsonl")
    assert "line 2 (id 'title0-1'): answers has 2 texts but 1 answer_start" in message
    past = [{**good[0], "answers": {"text": [good[0]["answers"]["text"][0]], "answer_start": [500]}}]
    assert "(id 'title0-0'): answer" in _flat_error(tmp_path, past, "flat-parquet", "bad.parquet")
    assert "runs past its context" in _flat_error(tmp_path, past, "flat-parquet", "bad.parquet")
    no_starts = [{**good[0], "answers": {"text": ["x"]}}]
    assert "(id 'title0-0').answers has no 'answer_start'" in _flat_error(tmp_path, no_starts)
    no_title = [{k: v for k, v in r.items() if k != "title"} for r in good]
    assert "has no column 'title'" in _flat_error(tmp_path, no_title, "flat-parquet", "bad.parquet")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good[0]) + "\n{not json\n")
    with pytest.raises(ConfigError, match="broken.jsonl: line 2: "):
        read_squad_file(str(broken))
    assert "holds no questions" in _flat_error(tmp_path, [], "flat-json")


def test_a_bad_flat_file_exits_2_before_any_work(tmp_path: Path, capsys) -> None:
    good = _flat([_article("T", 3)])
    uneven = [good[0], {**good[1], "answers": {"text": ["a"], "answer_start": [0, 1]}}]
    path = _write_layout(tmp_path / "bad.jsonl", uneven, "flat-jsonl")
    assert "answers has 1 text but 2 answer_starts" in _bad(tmp_path, capsys, f"data.path={path}")
    # unanswerable flat questions need task.version=2, as nested ones do
    path = _write_layout(tmp_path / "v2.parquet", _flat(_v2_articles(1, 3)), "flat-parquet")
    assert "set task.version=2" in _bad(tmp_path, capsys, f"data.path={path}")


# ----------------------------------------------------------------------------- metrics


def test_normalisation_follows_the_official_script() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"


def test_exact_match_and_f1_v1_by_hand() -> None:
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    # pred tokens [in, paris, france]; against "paris": 1 common, P = 1/3, R = 1 -> F1 = 2 * (1/3) / (4/3) = 0.5
    assert f1_score("in Paris France", ["Paris", "France"]) == pytest.approx(0.5)
    assert exact_match("in Paris France", ["Paris", "France"]) == 0.0
    # the best reference counts: "paris france" against "Paris, France" is exact
    assert exact_match("paris france", ["Paris", "Paris, France"]) == 1.0
    assert exact_match("", ["Paris"]) == 0.0 and f1_score("", ["Paris"]) == 0.0
    # v1: a reference that normalises to nothing matches an article exactly, but has no common token
    assert exact_match("a", ["the"]) == 1.0 and f1_score("a", ["the"]) == 0.0


def test_exact_match_and_f1_v2_unanswerable_by_hand() -> None:
    # an unanswerable question (no references) scores 1 only for an empty prediction
    assert exact_match("", [], v2=True) == 1.0 and f1_score("", [], v2=True) == 1.0
    assert exact_match("Paris", [], v2=True) == 0.0 and f1_score("Paris", [], v2=True) == 0.0
    # v2 drops references that normalise to nothing: ["the"] is read as unanswerable
    assert exact_match("", ["the"], v2=True) == 1.0 and f1_score("", ["the"], v2=True) == 1.0
    # an empty prediction on an answerable question scores 0
    assert f1_score("", ["Paris"], v2=True) == 0.0
    # answerable questions score as under v1
    assert f1_score("in Paris France", ["Paris"], v2=True) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- windows


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled")


def test_windows_put_every_answer_in_the_right_window_or_label_no_answer(tokenizer) -> None:
    # Prepare: a 40-word context, a question for every word (answers at every position, so some sit
    # on a window edge), windows of 24 tokens overlapping by 6
    art = _article("T", 40, words=40)
    para = art["paragraphs"][0]
    frame = pd.DataFrame(
        [
            {
                "question": q["question"],
                "context": para["context"],
                "answer_texts": [q["answers"][0]["text"]],
                "answer_starts": [q["answers"][0]["answer_start"]],
            }
            for q in para["qas"]
        ]
    )
    # Execute
    data = windows(frame, tokenizer, max_length=24, stride=6)
    # Assert
    per_question = np.bincount(data.question)
    assert per_question.min() >= 2  # every context needed several windows
    for w in range(len(data)):
        q, offs = int(data.question[w]), data.offsets[w]
        start, end = frame["answer_starts"][q][0], frame["answer_starts"][q][0] + len(frame["answer_texts"][q][0])
        inside = [o for o in offs if o is not None]
        holds = inside[0][0] <= start and end <= inside[-1][1]
        if holds:  # the labelled tokens give back exactly the answer's characters
            s, e = data.starts[w], data.ends[w]
            assert para["context"][offs[s][0] : offs[e][1]] == frame["answer_texts"][q][0]
        else:  # no-answer: the [CLS] position
            assert data.starts[w] == data.ends[w] == data.cls[w] == 0
    # every answer lies whole in at least one window (the overlap is longer than any answer)
    answered = {int(data.question[w]) for w in range(len(data)) if data.starts[w] != data.cls[w]}
    assert answered == set(range(len(frame)))
    batch = data.batch([0, 1])
    assert set(batch) >= {"input_ids", "attention_mask", "start_positions", "end_positions"}


def test_n_best_decoding_by_hand() -> None:
    # Prepare: two windows of one question; tokens 0 ([CLS]) and 1 (question) have no context offsets
    context = "zero one two three four five"
    offs = [None, None, (0, 4), (5, 8), (9, 12), (13, 18)]
    s1 = np.array([9.0, 9.0, 1.0, 3.0, 0.0, 0.0])  # the best start/end sit outside the context
    e1 = np.array([9.0, 9.0, 0.0, 0.5, 2.0, -1.0])
    offs2 = [None, None, (9, 12), (13, 18), (19, 23), None]
    s2 = np.array([0.0, 0.0, 0.0, 2.5, 0.0, 0.0])
    e2 = np.array([0.0, 0.0, 0.1, 0.2, 2.0, -1.0])
    # Execute / Assert: window 1's best valid span is tokens 3..4 ("one two", 3 + 2 = 5), window 2's
    # tokens 3..4 ("three four", 2.5 + 2 = 4.5): the first wins
    args = dict(cls=[0, 0], n_best=4, max_answer_length=5)
    assert decode([s1, s2], [e1, e2], [offs, offs2], context, no_answer=False, **args) == "one two"
    # one-token answers only: window 1's token 3 ("one", 3 + 0.5) beats window 2's ("three", 2.5 + 0.2)
    assert (
        decode([s1, s2], [e1, e2], [offs, offs2], context, no_answer=False, **{**args, "max_answer_length": 1}) == "one"
    )
    # n_best = 1 keeps only each window's top start and end (outside the context in window 1)
    assert decode([s1, s2], [e1, e2], [offs, offs2], context, no_answer=False, **{**args, "n_best": 1}) == "three four"
    # v2: the no-answer score is the lowest [CLS] score over the windows (0 here) against 5
    assert decode([s1, s2], [e1, e2], [offs, offs2], context, no_answer=True, **args) == "one two"
    s2[0] = e2[0] = 3.0
    s1[0] = e1[0] = 3.0  # null = 6 > 5: empty answer; a threshold of 1.5 keeps the span
    assert decode([s1, s2], [e1, e2], [offs, offs2], context, no_answer=True, **args) == ""
    assert decode([s1, s2], [e1, e2], [offs, offs2], context, no_answer=True, null_threshold=1.5, **args) == "one two"


# ----------------------------------------------------------------------------- partition


def _build(path: Path, *overrides: str):
    cfg = load_config(
        None,
        ["task.name=qa", "data.dataset=file", f"data.path={path}", "model.max_length=48", "task.stride=16", *overrides],
    )
    return QuestionAnswering.build(cfg, load_tokenizer("bundled"))


def test_title_partition_keeps_every_question_and_follows_h(tmp_path: Path) -> None:
    # Prepare: 8 articles of 40 questions
    path = _write(tmp_path / "squad.json", [_article(f"title{t}", 40, seed=t) for t in range(8)])
    for h in (1.0, 0.0):
        # Execute
        task, data = _build(path, "data.num_clients=4", f"data.heterogeneity={h}", "data.test_fraction=0.2")
        # Assert: every question in exactly one client's train or test split
        ids = [i for part in [*data.train, *data.test] for i in part.questions["id"]]
        assert sorted(ids) == sorted(f"title{t}-{i}" for t in range(8) for i in range(40))
        titles = [sorted(set(part.questions["title"])) for part in data.train]
        if h == 1.0:  # title-sorted shards, train and test alike: client k's titles come after client k-1's
            tests = [sorted(set(part.questions["title"])) for part in data.test]
            for k in range(1, 4):
                assert titles[k - 1][-1] <= titles[k][0] and tests[k - 1][-1] <= tests[k][0]
            # each client is tested mostly on the articles it trained on (shard edges differ by a title)
            seen = [
                np.isin(te.questions["title"], tr.questions["title"]).mean()
                for tr, te in zip(data.train, data.test, strict=True)
            ]
            assert min(seen) >= 0.5, seen
        else:  # i.i.d.: every client sees most titles
            assert all(len(t) >= 5 for t in titles)
    assert task.name == "qa"


def _windows_by_question(data) -> dict[str, list[tuple]]:
    found: dict[str, list[tuple]] = {}
    for w, q in enumerate(data.question):
        found.setdefault(data.questions["id"].iloc[q], []).append((data.ids[w], int(data.starts[w]), int(data.ends[w])))
    return found


def test_a_clients_windows_are_cut_when_first_used_as_from_the_whole_split(tmp_path: Path) -> None:
    # Prepare: contexts of 40 words, several windows each
    path = _write(tmp_path / "squad.json", [_article(f"title{t}", 6, words=40, seed=t) for t in range(4)])
    overrides = ["model.max_length=48", "task.stride=16", "data.num_clients=3", "data.partition=iid"]
    cfg = load_config(None, ["task.name=qa", "data.dataset=file", f"data.path={path}", *overrides])
    tokenizer = load_tokenizer("bundled")
    # Execute
    _, data = QuestionAnswering.build(cfg, tokenizer)
    # Assert: nothing windowed until a client's data is asked for, then only that client's
    assert not data.train._done and not data.test._done
    client = data.train[1]
    assert set(data.train._done) == {1} and not data.test._done
    splits = load_squad(cfg.data, cfg.seed)
    rows = client_indices(splits, cfg.data, cfg.seed)[0][1]
    assert list(client.questions["id"]) == list(splits.train["id"].iloc[rows])
    whole = _windows_by_question(windows(splits.train, tokenizer, max_length=48, stride=16))
    mine = _windows_by_question(client)
    assert max(len(w) for w in mine.values()) >= 2  # contexts cut into several windows
    assert mine == {q: whole[q] for q in client.questions["id"]}  # the whole split's windows, question by question


def test_a_question_that_leaves_no_room_for_windows_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    long = _article("T", 4, words=30)
    long["paragraphs"][0]["qas"][2]["question"] = "which " * 40 + "word?"
    path = _write(tmp_path / "long.json", [long])
    message = _bad(tmp_path, capsys, f"data.path={path}", "data.num_clients=1")
    assert "question 'T-2' takes" in message and "raise model.max_length or lower task.stride" in message
    # the same question over a context that fits in what it leaves is windowed as usual
    short = _article("T", 4, words=1)
    short["paragraphs"][0]["qas"][2]["question"] = "which " * 40 + "word?"
    frame = read_squad_json(str(_write(tmp_path / "short.json", [short])))
    check_windows(frame, load_tokenizer("bundled"), 48, 16)
    assert len(windows(frame, load_tokenizer("bundled"), 48, 16)) == 4


# ----------------------------------------------------------------------------- export


def _tiny_qa(seed: int = 0):
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertForQuestionAnswering(config).double().eval()


def test_peft_export_reproduces_start_and_end_logits(tmp_path: Path) -> None:
    # Prepare: a trained-looking (x, y_k) with a personal span head
    model = TwoLevelModel(
        _tiny_qa(),
        QuestionAnswering(TaskConfig(name="qa")),
        ["query", "value"],
        4,
        8,
        personal_rank=2,
        personal_lora_alpha=4,
        head="personal",
    )
    g = torch.Generator().manual_seed(0)
    params = {**model.initial_common(), **model.initial_personal(g)}
    params = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    batch = {
        "input_ids": torch.randint(1, 60, (3, 9), generator=g),
        "attention_mask": torch.ones(3, 9, dtype=torch.long),
    }
    model.train(False)
    with torch.no_grad():
        expected = model.outputs(params, batch)
    # Execute
    PeftExporter(_tiny_qa(), model.layout, ["query", "value"]).save(params, tmp_path / "client0")
    loaded = PeftModel.from_pretrained(_tiny_qa(), tmp_path / "client0").eval()
    # Assert
    with torch.no_grad():
        got = loaded(**batch)
    torch.testing.assert_close(got.start_logits, expected.start_logits)
    torch.testing.assert_close(got.end_logits, expected.end_logits)


# ----------------------------------------------------------------------------- bad input


def _bad(tmp_path: Path, capsys, *overrides: str) -> str:
    out = tmp_path / "out"
    code = main(
        [
            "run",
            "task.name=qa",
            "data.dataset=file",
            "model.max_length=48",
            "task.stride=16",
            *overrides,
            "--out",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def test_bad_qa_input_exits_2_with_one_line_before_any_work(tmp_path: Path, capsys) -> None:
    no_fields = tmp_path / "nofields.json"
    no_fields.write_text(json.dumps({"data": [{"title": "x", "paragraphs": [{"context": "abc"}]}]}))
    assert "has no 'qas'" in _bad(tmp_path, capsys, f"data.path={no_fields}")
    not_squad = tmp_path / "list.json"
    not_squad.write_text("[1, 2]")
    assert "not a SQuAD file" in _bad(tmp_path, capsys, f"data.path={not_squad}")
    past = _article("T", 2)
    past["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 500
    path = _write(tmp_path / "past.json", [past])
    assert "runs past its context" in _bad(tmp_path, capsys, f"data.path={path}")
    good = _write(tmp_path / "good.json", [_article("T", 4)])
    assert "task.stride (48) must be smaller than model.max_length (48)" in _bad(
        tmp_path, capsys, f"data.path={good}", "task.stride=48"
    )
    v2 = _article("T", 4)
    v2["paragraphs"][0]["qas"][0].update(
        is_impossible=True, answers=[], plausible_answers=[{"text": "x", "answer_start": 0}]
    )
    path = _write(tmp_path / "v2.json", [v2])
    assert "set task.version=2" in _bad(tmp_path, capsys, f"data.path={path}")


def test_a_tokenizer_without_offsets_is_refused(tmp_path: Path) -> None:
    class Slow:
        is_fast = False

    cfg = load_config(
        None, ["task.name=qa", "data.dataset=file", f"data.path={_write(tmp_path / 's.json', [_article('T', 3)])}"]
    )
    with pytest.raises(ConfigError, match="offset mapping"):
        QuestionAnswering.build(cfg, Slow())


def test_a_model_without_a_span_head_is_refused(tmp_path: Path) -> None:
    from transformers import ViTConfig

    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigError, match="has no QuestionAnswering head"):
        QuestionAnswering(TaskConfig(name="qa")).load_model(str(tmp_path))


# ----------------------------------------------------------------------------- integration

LORA_METHODS = ["pf2lora", "homlora"]  # the engines are method-blind; test_flower covers every method


def _tiny_qa_args(model_dir: Path, path: Path, methods: list[str]) -> list[str]:
    """A tiny QA run: the tiny BERT, SQuAD-style articles at ``path``, 2 clients, ``methods``."""
    return [
        f"model.name={model_dir}",
        "task.name=qa",
        "data.dataset=file",
        f"data.path={path}",
        "model.max_length=32",
        "task.stride=8",
        "data.num_clients=2",
        *TINY_TRAIN,
        f"algorithms=[{','.join(methods)}]",
    ]


@pytest.mark.integration
def test_tiny_qa_run_on_both_engines_agrees(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: 6 articles, 2 clients, every LoRA method
    path = _write(tmp_path / "squad.json", [_article(f"title{t}", 6, seed=t) for t in range(6)])
    common = [*_tiny_qa_args(tiny_model_dir, path, LORA_METHODS), "data.heterogeneity=0.5", "train.rounds=2"]
    local, flower = tmp_path / "local", tmp_path / "flower"
    # Execute
    assert main(["run", *common, "--out", str(local), "--quiet"]) == 0
    assert main(["run", *common, "engine=flower", "--out", str(flower), "--quiet"]) == 0
    # Assert: per-client EM, F1 and loss agree within 1e-5; results name the task's metrics
    a, b = json.loads((local / "results.json").read_text()), json.loads((flower / "results.json").read_text())
    for method in LORA_METHODS:
        assert a[method]["metric_names"] == ["f1", "exact_match"]
        for cid, metrics in a[method]["clients"].items():
            for key in ("f1", "exact_match", "loss"):
                assert abs(metrics[key] - b[method]["clients"][cid][key]) <= 1e-5, (method, cid, key)
        assert set(a[method]["mean"]) >= {"f1", "exact_match"}
    assert (local / "f1_per_client.png").is_file()


def test_auto_targets_follow_the_model_type() -> None:
    from conftest import tiny_bert

    from pf2lora.adapters.two_level import resolve_targets

    assert resolve_targets(tiny_bert(), ["auto"]) == ["query", "value"]  # PEFT's default for BERT
    assert resolve_targets(tiny_bert(), ["key"]) == ["key"]


@pytest.mark.parametrize("name", ["squad_v1", "squad_v2"])
def test_the_paper_squad_configs_hold_its_settings(name: str) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert (cfg.task.name, cfg.task.version) == ("qa", 1 if name == "squad_v1" else 2)
    assert (cfg.model.name, cfg.data.num_clients, cfg.data.heterogeneity) == ("microsoft/deberta-v3-base", 4, 0.5)
    assert (cfg.lora.rank, cfg.lora.personal_rank, cfg.hetlora.r_min, cfg.hetlora.r_max) == (8, 4, 6, 14)
    assert cfg.for_method("pf2lora").train.lower_lr == 1.0e-2


@pytest.mark.integration
def test_squad_v2_config_runs_on_a_flat_file_and_scores_unanswerable_questions(tmp_path: Path) -> None:
    # Prepare: 8 articles of 10 questions, every third unanswerable, in the Hub's flat layout
    path = _write_layout(tmp_path / "train-v2.json", _flat(_v2_articles(8, 10)), "flat-json")
    out = tmp_path / "run"
    overrides = ["model.name=bundled", f"data.path={path}", "algorithms=[homlora]", "train.rounds=1"]
    overrides += ["train.local_steps=1", "train.batch_size=4", "train.threads=1", "model.max_length=48"]
    # the empty answer for every question (no-answer wins whatever the spans score): each client's EM
    # and F1 are then the share of its test questions that are unanswerable
    overrides += ["task.stride=16", "task.null_threshold=-1000000"]
    # Execute: the paper's v2 config (4 clients, h = 0.5), tiny
    assert main(["run", str(REPO / "configs" / "squad_v2.yaml"), *overrides, "--out", str(out), "--quiet"]) == 0
    # Assert: every client evaluated on its test questions, unanswerable ones among them, scored by
    # the v2 rules (an unanswerable question scores 1 for the empty answer, an answerable one 0)
    result = json.loads((out / "results.json").read_text())["homlora"]
    assert set(result["clients"]) == {"0", "1", "2", "3"}
    unanswerable = 0
    for cid, metrics in result["clients"].items():
        lines = (out / "predictions" / "homlora" / f"client{cid}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == metrics["num_examples"] and all(r["prediction"] == "" for r in records)
        share = np.mean([not r["answers"] for r in records])
        assert metrics["exact_match"] == pytest.approx(share) and metrics["f1"] == pytest.approx(share)
        unanswerable += sum(not r["answers"] for r in records)
    assert unanswerable >= 4  # 16 test questions, about a third of them unanswerable
    # the exported adapter's card names the bundled model's Hub repository, not its folder here
    card = (out / "adapters" / "homlora" / "client0" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"


XQUAD = REPO.parent / "shared" / "data" / "squad" / "xquad.en.json"


@pytest.mark.integration
@pytest.mark.skipif(not XQUAD.is_file(), reason="XQuAD (xquad.en.json) is not in ../shared/data on this machine")
def test_squad_config_runs_offline_on_xquad(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = ["model.name=bundled", f"data.path={XQUAD}", "data.num_clients=2", "train.rounds=1"]
    overrides += ["train.local_steps=2", "algorithms=[homlora]", "data.max_test_examples=60", "train.threads=2"]
    assert main(["run", str(REPO / "configs" / "squad_v1.yaml"), *overrides, "--out", str(out), "--quiet"]) == 0
    result = json.loads((out / "results.json").read_text())["homlora"]
    assert set(result["clients"]) == {"0", "1"}
    for metrics in [*result["clients"].values(), result["mean"]]:
        assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 1.0


def test_every_lora_method_and_hypergradient_trains_and_evaluates_qa(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare: a tiny QA federation; PF2LoRA in its four hypergradient modes beside every other method
    path = _write(tmp_path / "squad.json", [_article(f"title{t}", 4, seed=t) for t in range(4)])
    common = [f"model.name={tiny_model_dir}", "task.name=qa", "data.dataset=file", f"data.path={path}"]
    common += ["model.max_length=32", "task.stride=8", "data.num_clients=2", "train.rounds=1", *TINY_TRAIN]
    grid = compare.plan(
        None,
        [*common, "algorithms=homlora,hetlora,perfedavg,centralized,pf2lora"],
        variants=[f"pf2lora train.hypergradient={mode}" for mode in ("exact", "first_order", "joint")],
    )
    # Execute
    table = compare.execute(grid, tmp_path / "grid")
    # Assert: every row has per-client EM and F1 in [0, 1] and a finite loss
    assert len(table["rows"]) == 8
    for row, column, seed, _ in grid.runs:
        result = json.loads((compare.run_dir(tmp_path / "grid", row, column, seed) / "results.json").read_text())
        for metrics in result[row.algorithm]["clients"].values():
            assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0
            assert np.isfinite(metrics["loss"])


@pytest.mark.integration
def test_the_newer_lora_methods_answer_questions(tiny_model_dir: Path, tmp_path: Path) -> None:
    """FedSA-LoRA, FFA-LoRA, FlexLoRA, FedDPA and FedEx-LoRA on the QA task (the local engine; the
    engines are task-blind and test_flower checks them on Flower)."""
    newer = ["fedsa_lora", "ffa_lora", "flexlora", "feddpa", "fedex_lora"]
    path = _write(tmp_path / "squad.json", [_article(f"title{t}", 6, seed=t) for t in range(4)])
    args = [*_tiny_qa_args(tiny_model_dir, path, newer), "train.rounds=1", "flexlora.r_min=2", "flexlora.r_max=4"]
    assert main(["run", *args, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for method in newer:
        assert results[method]["metric_names"] == ["f1", "exact_match"]
        assert all(0 <= m["f1"] <= 100 for m in results[method]["clients"].values()), method
