"""Exported PEFT adapters reproduce a client's two-level model with stock PEFT."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import random_batch, tiny_bert, tiny_two_level
from peft import PeftModel

from pf2lora.adapters.export import PeftExporter


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
