"""Data-to-text generation: the sources, the prompt-masked loss, beam search through a client's
adapters and through its exported PEFT adapter, the metrics on documented and hand-made cases,
and the CLI on a tiny causal LM (both engines) with its bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch

from pf2lora.config import ConfigError, DataConfig, ExperimentConfig, TaskConfig
from pf2lora.data import generation as gen_data
from pf2lora.tasks import text_metrics as tm
from pf2lora.tasks.generation import IGNORE, Generation, encode, prompt_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

NAMES = ["The Eagle", "Aromi", "Zizzi", "Cotto"]
FOODS = ["French", "Italian", "English", "Chinese", "Indian"]
AREAS = ["riverside", "city centre"]


def e2e_rows() -> list[dict[str, str]]:
    """An E2E-style CSV: 4 restaurants, 5 MRs each, 2 references per MR."""
    rows = []
    for name in NAMES:
        for i, food in enumerate(FOODS):
            area = AREAS[i % 2]
            mr = f"name[{name}], food[{food}], area[{area}]"
            rows.append({"mr": mr, "ref": f"{name} serves {food} food in the {area} ."})
            rows.append({"mr": mr, "ref": f"In the {area} , {name} has {food} food ."})
    return rows


def word_tokenizer(texts: list[str]):
    """A word-level fast tokenizer over ``texts`` (offline; [PAD] 0, [EOS] 1, [UNK] 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.replace("[", " [ ").replace("]", " ] ").split()} | set("|:[],.\n"))
    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")


def _corpus() -> list[str]:
    rows = e2e_rows()
    return [gen_data.linearise_mr(r["mr"]) for r in rows] + [r["ref"] for r in rows] + ["name", "food", "area"]


def tiny_lm(kind: str, vocab: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":  # attention through Conv1D (c_attn)
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128, eos_token_id=1)
        config.pad_token_id = 0
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=1,
        pad_token_id=0,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a word-level tokenizer, saved like any pretrained causal LM."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_tokenizer(_corpus())
    tiny_lm("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def e2e_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("e2e") / "e2e.csv"
    pd.DataFrame(e2e_rows()).to_csv(path, index=False)
    return path


# --- metrics -----------------------------------------------------------------------------------


def test_bleu_and_ter_match_documented_outputs():
    """sacrebleu's README: BLEU = 48.53 on this system output; the TER metric card of Hugging Face
    evaluate (sacrebleu's TER, case-sensitive): 150.0 on its example (15 edits, reference length 10)."""
    refs = [
        ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
        ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
    ]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    per_input = [list(r) for r in zip(*refs, strict=True)]
    assert tm.bleu(hyps, per_input, lowercase=False) == pytest.approx(0.4853, abs=5e-5)
    predictions = [
        "does this sentence match??",
        "what about this sentence?",
        "What did the TER metric user say to the developer?",
    ]
    references = [
        ["does this sentence match", "does this sentence match!?!"],
        ["wHaT aBoUt ThIs SeNtEnCe?", "wHaT aBoUt ThIs SeNtEnCe?"],
        ["Your jokes are...", "...TERrible"],
    ]
    assert tm.ter(predictions, references, lowercase=False) == pytest.approx(1.5)


NLTK_HYP = "It is a guide to action which ensures that the military always obeys the commands of the party"
NLTK_REFS = [
    "It is a guide to action that ensures that the military will forever heed Party commands",
    "It is the guiding principle which guarantees the military forces always being under the command of the Party",
    "It is the practical guide for the army always to heed the directions of the party",
]


def test_nist_and_meteor_match_nltks_documented_values():
    """nltk's docstrings: NIST 3.3709 and METEOR 0.6944 for this hypothesis and three references."""
    assert tm.nist([NLTK_HYP], [NLTK_REFS], lowercase=False) == pytest.approx(3.3709, abs=1e-4)
    assert tm.meteor([NLTK_HYP], [NLTK_REFS]) == pytest.approx(0.6944, abs=1e-4)


def test_rouge_l_takes_the_best_reference_by_hand():
    # "a b c d" against "a c d e": LCS "a c d" = 3, P = R = 3/4; against "x y": 0 -> best 0.75
    assert tm.rouge_l(["a b c d"], [["x y", "a c d e"]]) == pytest.approx(0.75)
    # two inputs: mean of 1.0 and 0.5 (LCS 1 of 2 words each side)
    assert tm.rouge_l(["p q", "u v"], [["p q"], ["u w"]]) == pytest.approx(0.75)


def test_cider_of_exact_outputs_with_disjoint_inputs_is_ten():
    """Two inputs with no shared n-gram, each output equal to its one reference: every n-gram has
    document frequency 1 of 2, so tf-idf vectors of output and reference are equal (cosine 1 for
    n = 1..4), the length penalty is 1, and CIDEr-D = 10 x mean over n of 1 = 10."""
    outputs = ["red fox jumps high today", "blue cat sleeps all night"]
    assert tm.cider(outputs, [[o] for o in outputs]) == pytest.approx(10.0, abs=1e-9)


def test_metrics_handle_variable_references_and_empty_outputs():
    preds = ["the eagle serves french food", ""]
    refs = [["the eagle serves french food", "french food at the eagle", "the eagle has french food"], ["aromi"]]
    scores = tm.score_all(preds, refs)
    assert set(scores) == set(tm.METRICS)
    assert 0 < scores["bleu"] < 1 and 0 < scores["meteor"] < 1 and scores["ter"] > 0
    perfect = tm.score_all(["the eagle serves french food"], [["the eagle serves french food"]])
    assert perfect["bleu"] == pytest.approx(1.0) and perfect["ter"] == pytest.approx(0.0)
    assert perfect["rouge_l"] == pytest.approx(1.0) and perfect["meteor"] > 0.99


# --- data --------------------------------------------------------------------------------------


def test_e2e_meaning_representation_is_linearised_and_keyed_by_name():
    mr = "name[The Eagle], eatType[coffee shop], food[French], priceRange[£20-25]"
    assert gen_data.linearise_mr(mr) == "name : The Eagle | eatType : coffee shop | food : French | priceRange : £20-25"
    assert gen_data.mr_name(mr) == "The Eagle"
    with pytest.raises(ConfigError, match="meaning representation"):
        gen_data.linearise_mr("no slots here")


def test_e2e_csv_groups_references_per_input(e2e_csv):
    frame = gen_data._read(str(e2e_csv), DataConfig(dataset="e2e"))
    assert len(frame) == 20 and all(len(r) == 2 for r in frame["references"])
    assert set(frame["key"]) == set(NAMES)


def _webnlg_entries() -> list[dict]:
    return [
        {
            "category": cat,
            "modified_triple_sets": {"mtriple_set": [[f"{cat}_{i} | country | Land_{i}"]]},
            "lex": {"text": [f"{cat} {i} is in Land {i}.", f"Land {i} has {cat} {i}."]},
        }
        for cat in ("Airport", "Food", "City")
        for i in range(3)
    ]


def test_webnlg_json_lines_and_xml_read_the_same(tmp_path):
    entries = _webnlg_entries()
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(e) + "\n" for e in entries))
    xml = ["<benchmark><entries>"]
    for i, e in enumerate(entries):
        triple = e["modified_triple_sets"]["mtriple_set"][0][0]
        lexes = "".join(
            f'<lex comment="good" lid="Id{j}"><sortedtripleset/><text>{t}</text></lex>'
            for j, t in enumerate(e["lex"]["text"])
        )
        xml.append(
            f'<entry category="{e["category"]}" eid="Id{i}" size="1"><originaltripleset><otriple>x</otriple>'
            f"</originaltripleset><modifiedtripleset><mtriple>{triple}</mtriple></modifiedtripleset>{lexes}</entry>"
        )
    xml.append("</entries></benchmark>")
    xml_path = tmp_path / "train.xml"
    xml_path.write_text("".join(xml))
    a = gen_data._read(str(jsonl), DataConfig(dataset="webnlg"))
    b = gen_data._read(str(xml_path), DataConfig(dataset="webnlg"))
    pd.testing.assert_frame_equal(a, b)
    assert a["source"][0] == "Airport 0 | country | Land 0" and len(a["references"][0]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"category": "Food", "lex": {"text": ["x"]}}) + "\n")
    with pytest.raises(ConfigError, match="mtriple_set"):
        gen_data._read(str(bad), DataConfig(dataset="webnlg"))


def test_webnlg_entry_without_modified_triples_reads_its_original_ones(tmp_path):
    """The enriched v2.0 test entries carry empty modified sets: their original DBpedia triples are
    read instead, language tags and datatypes dropped as the modified sets drop them."""
    original = ['Aarhus_Airport | cityServed | "Aarhus, Denmark"@en', 'Aarhus_Airport | elevation | "25.0"^^xsd:double']
    entry = {
        "category": "Airport",
        "modified_triple_sets": {"mtriple_set": [[]]},
        "original_triple_sets": {"otriple_set": [original]},
        "lex": {"text": ["Aarhus Airport serves Aarhus, Denmark, at 25 metres."]},
    }
    other = {**entry, "original_triple_sets": {"otriple_set": [["Abilene_Airport | city | Abilene"]]}}
    jsonl = tmp_path / "test.jsonl"
    jsonl.write_text(json.dumps(entry) + "\n" + json.dumps(other) + "\n")
    frame = gen_data._read(str(jsonl), DataConfig(dataset="webnlg"))
    assert frame["source"].tolist() == [
        'Aarhus Airport | cityServed | "Aarhus, Denmark" ; Aarhus Airport | elevation | 25.0',
        "Abilene Airport | city | Abilene",
    ]
    otriples = "".join(f"<otriple>{t}</otriple>" for t in original)
    xml = tmp_path / "test.xml"
    xml.write_text(
        f'<benchmark><entries><entry category="Airport" eid="Id1" size="2"><originaltripleset>{otriples}'
        "</originaltripleset><modifiedtripleset/><lex><text>Aarhus Airport serves Aarhus, Denmark, at 25 metres."
        "</text></lex></entry></entries></benchmark>"
    )
    assert gen_data._read(str(xml), DataConfig(dataset="webnlg"))["source"][0] == frame["source"][0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({**entry, "original_triple_sets": {"otriple_set": [[]]}}) + "\n")
    with pytest.raises(ConfigError, match="no triples"):
        gen_data._read(str(empty), DataConfig(dataset="webnlg"))


def test_test_inputs_stay_within_training_keys_and_clients(e2e_csv, tmp_path):
    """The split keeps every test key among the training keys; partition=key gives each client's
    test inputs only keys its own training data covers. A separate test file drops unseen keys."""
    from pf2lora.data.text import client_indices

    cfg = DataConfig(dataset="e2e", path=str(e2e_csv), num_clients=2, partition="key", test_fraction=0.4)
    splits = gen_data.load_generation(cfg, seed=3)
    assert set(splits.test["key"]) <= set(splits.train["key"])
    assert len(splits.train) + len(splits.test) == 20  # no input dropped
    train_rows, test_rows = client_indices(splits, cfg, 3)
    for tr, te in zip(train_rows, test_rows, strict=True):
        assert set(splits.test["key"].iloc[te]) <= set(splits.train["key"].iloc[tr])
    unseen = tmp_path / "test.csv"
    pd.DataFrame([{"mr": "name[Nowhere], food[Thai]", "ref": "Nowhere has Thai food."}, *e2e_rows()[:2]]).to_csv(
        unseen, index=False
    )
    split2 = gen_data.load_generation(DataConfig(dataset="e2e", path=str(e2e_csv), test_path=str(unseen)), 0)
    assert list(split2.test["key"]) == ["The Eagle"]


def test_user_file_needs_its_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"src": ["a b", "a b", "c"], "tgt": ["x", "y", "z"], "k": ["1", "1", "2"]}).to_csv(path, index=False)
    frame = gen_data._read(
        str(path), DataConfig(dataset="file", text_column="src", target_column="tgt", key_column="k")
    )
    assert list(frame["references"]) == [["x", "y"], ["z"]]
    with pytest.raises(ConfigError, match="no column 'source'"):
        gen_data._read(str(path), DataConfig(dataset="file"))


# --- loss, generation, export ------------------------------------------------------------------


def _encoded(lm_dir: Path, max_length: int = 64):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    frame = gen_data._grouped(gen_data.read_e2e_csv_frame(pd.DataFrame(e2e_rows())))
    return tokenizer, frame, encode(frame, tokenizer, max_length)


def test_loss_counts_only_target_tokens(lm_dir):
    from transformers import AutoModelForCausalLM

    tokenizer, frame, data = _encoded(lm_dir)
    batch = data.batch([0, 1, 2])
    for row in range(3):
        n_prompt = int(data.prompt_lengths[row])
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == IGNORE).all()
        length = len(data.ids[row])
        assert (labels[n_prompt:length] == batch["input_ids"][row, n_prompt:length]).all()
        assert (labels[length:] == IGNORE).all() and data.ids[row][-1] == tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    task = Generation(TaskConfig(name="generation"), tokenizer, data.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = []
        for row in range(3):
            n_prompt, length = int(data.prompt_lengths[row]), len(data.ids[row])
            targets = batch["input_ids"][row, n_prompt:length]
            logp = torch.log_softmax(logits[row, n_prompt - 1 : length - 1].float(), -1)
            expected.append(-logp.gather(1, targets[:, None]).mean())
        assert task.loss(logits, batch).item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
        assert task.loss(logits, batch, "sum").item() == pytest.approx(torch.stack(expected).sum().item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_logits_only_from_the_first_target_on_give_the_same_loss_and_gradients(kind):
    tokenizer = word_tokenizer(_corpus())
    frame = gen_data._grouped(gen_data.read_e2e_csv_frame(pd.DataFrame(e2e_rows())))
    data = encode(frame.iloc[:4], tokenizer, 64)
    batch = data.batch(list(range(len(data)))[:5])
    model = tiny_lm(kind, len(tokenizer)).train(False)  # GPT-2's dropout off: the two passes alike
    task = Generation(TaskConfig(name="generation"), tokenizer, data.pad_id)
    full = task.model_inputs(batch)
    assert "logits_to_keep" not in full  # until check_model finds that the model takes it
    task.check_model(model, tokenizer)
    kept = task.model_inputs(batch)
    first = min(int(n) for n in data.prompt_lengths[:5])
    assert kept["logits_to_keep"] == batch["input_ids"].shape[1] - first + 1 < batch["input_ids"].shape[1]
    losses, grads = [], []
    for inputs in (full, kept):
        out = model(**inputs)
        losses.append(task.loss(out, batch))
        grads.append(torch.autograd.grad(losses[-1], [p for p in model.parameters() if p.requires_grad]))
    assert model(**kept).logits.shape[1] == kept["logits_to_keep"]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_prompt_longer_than_max_length_is_refused(lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    frame = gen_data._grouped(gen_data.read_e2e_csv_frame(pd.DataFrame(e2e_rows())))
    with pytest.raises(ConfigError, match="shorter than the longest prompt"):
        encode(frame, tokenizer, 8)


def test_a_clients_pairs_are_encoded_when_first_used_as_from_the_whole_split(lm_dir, e2e_csv):
    from transformers import AutoTokenizer

    from pf2lora.config import load_config
    from pf2lora.data.text import client_indices

    overrides = [f"model.name={lm_dir}", "model.max_length=48", f"data.path={e2e_csv}", "data.num_clients=2"]
    cfg = load_config(None, ["task.name=generation", "data.dataset=e2e", "data.partition=iid", *overrides])
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    task, data = Generation.build(cfg, tokenizer)
    assert not data.train._done and not data.test._done  # nothing encoded until a client's data is used
    client = data.train[1]
    assert set(data.train._done) == {1} and not data.test._done
    splits = gen_data.load_generation(cfg.data, cfg.seed)
    rows = client_indices(splits, cfg.data, cfg.seed)[0][1]
    whole = encode(splits.train, tokenizer, 48)

    def pairs(d, inputs) -> list[list[list[int]]]:  # each input's prompt and pairs, in the order of ``inputs``
        return [[d.prompts[r], *[d.ids[p] for p in range(len(d)) if d.pair_input[p] == r]] for r in inputs]

    assert pairs(client, range(client.num_inputs)) == pairs(whole, rows)
    assert sum(len(refs) for refs in client.inputs["references"]) == len(client) > client.num_inputs
    assert task.pad_id == whole.pad_id == client.pad_id
    # a prompt too long for model.max_length is refused at build, before any client is encoded
    with pytest.raises(ConfigError, match="shorter than the longest prompt"):
        Generation.build(
            load_config(None, ["task.name=generation", "data.dataset=e2e", *overrides, "model.max_length=9"]), tokenizer
        )


def _client_lm(kind: str, inputs: int):
    """A PF2LoRA client's tiny causal LM (common + personal adapters, random non-zero factors, beam
    width 3, 6 new tokens) and ``inputs`` E2E inputs: tokenizer, targets, model, params, data."""
    from pf2lora.adapters.two_level import TwoLevelModel

    tokenizer = word_tokenizer(_corpus())
    targets = ["c_attn"] if kind == "gpt2" else ["q_proj", "v_proj"]
    task = Generation(TaskConfig(name="generation", num_beams=3, max_new_tokens=6), tokenizer, 0)
    model = TwoLevelModel(tiny_lm(kind, len(tokenizer)), task, targets, 4, 8, personal_rank=2, personal_lora_alpha=4)
    g = torch.Generator().manual_seed(0)
    params = {**model.initial_common(), **model.initial_personal(g)}
    params = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    frame = gen_data._grouped(gen_data.read_e2e_csv_frame(pd.DataFrame(e2e_rows())))
    model.train(False)
    return tokenizer, targets, model, params, encode(frame.iloc[:inputs], tokenizer, 64)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_beam_search_through_adapters_equals_exported_peft_adapter(kind, tmp_path):
    """A PF2LoRA client's model (common + personal adapters, random non-zero factors) generates the
    same tokens through TwoLevelModel.generate as the stock PEFT adapter it exports."""
    from peft import PeftModel

    from pf2lora.adapters.export import PeftExporter
    from pf2lora.adapters.two_level import ModelAt

    tokenizer, targets, model, params, data = _client_lm(kind, 4)
    task = model.task

    ours = task.generate(
        ModelAt(None, lambda **kw: model.generate(params, **kw)), data, [0, 1, 2, 3], torch.device("cpu")
    )
    PeftExporter(tiny_lm(kind, len(tokenizer)), model.layout, targets, "CAUSAL_LM").save(params, tmp_path / "c0")
    peft = PeftModel.from_pretrained(tiny_lm(kind, len(tokenizer)), str(tmp_path / "c0")).eval()
    theirs = task.generate(ModelAt(None, peft.generate), data, [0, 1, 2, 3], torch.device("cpu"))
    assert ours == theirs
    assert any(ours)  # something was generated
    # and the adapters matter: the base model alone generates something else
    base = tiny_lm(kind, len(tokenizer)).eval()
    assert task.generate(ModelAt(None, base.generate), data, [0, 1, 2, 3], torch.device("cpu")) != ours


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_evaluation_through_merged_weights_equals_the_adapters(kind, tmp_path):
    """A full-precision base evaluates with the adapters folded into its weights: the same
    generations and metrics as through the adapters, in token-sized batches of any size."""
    from pf2lora.adapters.two_level import ModelAt
    from pf2lora.tasks.base import token_batches

    tokenizer, _, model, params, data = _client_lm(kind, 6)
    adapters = ModelAt(partial(model.outputs, params), partial(model.generate, params))
    results = []
    for tokens in (10**6, 60):  # one batch, then batches of one or two inputs
        task = Generation(TaskConfig(num_beams=3, max_new_tokens=6, eval_tokens=tokens), tokenizer, 0)
        model.task = task
        assert len(token_batches([len(p) for p in data.prompts], tokens, 3, 6)) == (1 if tokens > 1000 else 6)
        merged = model.evaluate(params, data, 4, tmp_path / f"merged{tokens}.jsonl")
        through = task.evaluate(adapters, data, 4, torch.device("cpu"), tmp_path / f"adapters{tokens}.jsonl")
        assert (tmp_path / f"merged{tokens}.jsonl").read_text() == (tmp_path / f"adapters{tokens}.jsonl").read_text()
        assert merged == pytest.approx(through, rel=1e-5)
        results.append(merged)
    assert results[0] == pytest.approx(results[1], rel=1e-5)


def test_token_batches_group_longest_first_within_the_budget():
    from pf2lora.tasks.base import token_batches

    lengths = [3, 9, 5, 9, 1]
    assert token_batches(lengths, 18) == [[1, 3], [2, 0, 4]]  # 2 x 9 tokens; then 3 padded to 5 tokens
    assert token_batches(lengths, 18, max_items=1) == [[1], [3], [2], [0], [4]]
    assert token_batches(lengths, 100, rows_per_item=2, extra=10) == [[1, 3], [2, 0, 4]]  # 2 rows of 19 each
    assert token_batches(lengths, 1) == [[1], [3], [2], [0], [4]]  # at least one item a batch
    assert token_batches([], 10) == []


# --- the CLI -----------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pf2lora.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def _args(lm_dir: Path, e2e_csv: Path, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--out",
        str(out),
        "task.name=generation",
        f"model.name={lm_dir}",
        "model.max_length=48",
        "data.dataset=e2e",
        f"data.path={e2e_csv}",
        "data.num_clients=2",
        "data.partition=key",
        "lora.target_modules=[q_proj,v_proj]",
        "lora.rank=4",
        "lora.personal_rank=2",
        "train.rounds=2",
        "train.local_steps=2",
        "train.batch_size=4",
        "train.eval_batch_size=8",
        "task.num_beams=2",
        "task.max_new_tokens=8",
        *extra,
    ]


@pytest.mark.integration
def test_tiny_lm_runs_on_both_engines_with_parity(lm_dir, e2e_csv, tmp_path):
    """PF2LoRA on the tiny Llama: every metric per client equal on the local engine and on Flower's
    simulation runtime; each client's generations and exported adapter kept (HOMLoRA on Flower is
    covered by the classification and QA parity tests: the engines do not know the task)."""
    local, flower = tmp_path / "local", tmp_path / "flower"
    for out, extra in ((local, []), (flower, ["engine=flower"])):
        done = _cli(*_args(lm_dir, e2e_csv, out, "algorithms=[pf2lora]", "train.rounds=1", *extra), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    a = json.loads((local / "results.json").read_text())["pf2lora"]
    b = json.loads((flower / "results.json").read_text())["pf2lora"]
    assert a["metric_names"][0] == "bleu"
    for cid, metrics in a["clients"].items():
        for name in (*tm.METRICS, "loss"):
            assert metrics[name] == pytest.approx(b["clients"][cid][name], abs=1e-5), (cid, name)
    for run in (local, flower):
        for cid in a["clients"]:
            lines = (run / "generations" / "pf2lora" / f"client{cid}.jsonl").read_text().splitlines()
            rows = [json.loads(x) for x in lines]
            assert len(rows) == a["clients"][cid]["num_examples"] and all(r["references"] for r in rows)
            assert set(rows[0]) == {"input", "prediction", "references"}
    assert (local / "adapters" / "pf2lora" / "client0" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.max_length=9"], "shorter than the longest prompt"),
        (["data.dataset=file"], "no column 'source'"),
        (["model.name=bundled"], "not a causal language model"),
    ],
)
def test_bad_generation_input_is_one_line_and_exit_2(lm_dir, e2e_csv, tmp_path, extra, message):
    done = _cli(*_args(lm_dir, e2e_csv, tmp_path / "out", *extra), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (tmp_path / "out" / "results.json").exists()


def test_e2e_shared_data_reads_and_keys_overlap():
    if not (SHARED / "e2e" / "devset.csv").exists():
        pytest.skip("the E2E files (tuetschek/e2e-dataset) are not in ../shared/data/e2e on this machine")
    cfg = DataConfig(dataset="e2e", path=f"{SHARED / 'e2e' / 'devset.csv'},{SHARED / 'e2e' / 'testset_w_refs.csv'}")
    splits = gen_data.load_generation(cfg, 0)
    assert len(splits.train) + len(splits.test) == 547 + 630
    assert (
        set(splits.test["key"]) <= set(splits.train["key"]) and len(splits.label_names) == 29
    )  # 20 + 18 names, 9 in both files


def test_webnlg_shared_data_drops_unseen_categories():
    if not (SHARED / "webnlg" / "train.jsonl").exists():
        pytest.skip("the WebNLG files (web_nlg) are not in ../shared/data/webnlg on this machine")
    cfg = DataConfig(
        dataset="webnlg", path=str(SHARED / "webnlg" / "train.jsonl"), test_path=str(SHARED / "webnlg" / "test.jsonl")
    )
    splits = gen_data.load_generation(cfg, 0)
    assert len(set(splits.train["key"])) == 10 and set(splits.test["key"]) <= set(splits.train["key"])
    assert splits.test["references"].map(len).min() >= 1
    # the 971 test entries of the 10 seen categories, each its own input (their modified triple
    # sets are empty in this release: the original triples are read)
    assert len(splits.test) > 900 and splits.test["source"].str.len().min() > 0


def test_prompt_format_and_paper_decoding_defaults():
    assert prompt_text("name : X") == "name : X\n"
    assert ExperimentConfig().task.num_beams == 10  # the paper's beam width


def test_examples_script_lines_up_methods_on_the_same_inputs(tmp_path):
    """scripts/examples.py: one row per drawn input, every method's text on that input, its first
    reference; inputs one method lacks are not drawn; a directory without generations is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("examples", Path(__file__).parents[1] / "scripts" / "examples.py")
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    inputs = {0: ["a | b | c", "d | e | f"], 1: ["g | h | i"]}
    for method, missing in (("pf2lora", None), ("hetlora", "d | e | f")):
        for k, sources in inputs.items():
            folder = tmp_path / method / "generations" / method
            folder.mkdir(parents=True, exist_ok=True)
            rows = [
                {"input": s, "prediction": f"{method} says {s}", "references": [f"ref of {s}", "another"]}
                for s in sources
                if s != missing
            ]
            (folder / f"client{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = examples.examples_table([tmp_path / "pf2lora", tmp_path / "hetlora"], per_client=5, seed=0)
    lines = table.splitlines()
    assert lines[0] == "| client | input | pf2lora | hetlora | reference (first of n) |"
    cell = "a \\| b \\| c"
    assert lines[2] == f"| 0 | {cell} | pf2lora says {cell} | hetlora says {cell} | ref of {cell} (n = 2) |"
    assert lines[3].startswith("| 1 | g \\| h \\| i |") and len(lines) == 4
    with pytest.raises(SystemExit, match="generations"):
        examples.read_generations(tmp_path)


NEWER = ["fedsa_lora", "ffa_lora", "flexlora", "feddpa", "fedex_lora"]


@pytest.mark.integration
def test_the_newer_lora_methods_generate(lm_dir, e2e_csv, tmp_path):
    """FedSA-LoRA, FFA-LoRA, FlexLoRA, FedDPA (its instance weights through beam search) and
    FedEx-LoRA (its residual in the base weight) on the tiny Llama: every client generates, every
    metric is a number, every client's adapter is exported."""
    extra = [f"algorithms=[{','.join(NEWER)}]", "train.rounds=1", "flexlora.r_min=2", "flexlora.r_max=4"]
    done = _cli(*_args(lm_dir, e2e_csv, tmp_path / "out", *extra), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for method in NEWER:
        for cid, metrics in results[method]["clients"].items():
            assert all(metrics[name] == metrics[name] for name in (*tm.METRICS, "loss")), (method, cid)  # no NaN
            lines = (tmp_path / "out" / "generations" / method / f"client{cid}.jsonl").read_text().splitlines()
            assert len(lines) == metrics["num_examples"]
            assert (tmp_path / "out" / "adapters" / method / f"client{cid}" / "adapter_model.safetensors").is_file()
