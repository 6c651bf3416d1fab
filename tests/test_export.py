"""Exported PEFT adapters reproduce a client's two-level model with stock PEFT."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import random_batch, tiny_bert, tiny_two_level
from peft import PeftModel
from transformers import AutoConfig, BertForSequenceClassification

from pf2lora.adapters.export import Card, PeftExporter
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
