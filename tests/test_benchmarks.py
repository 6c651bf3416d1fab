"""The benchmark's own arithmetic: FLOPs counted, weight bytes, the table of results.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_generation import tiny_lm

from benchmarks.roofline import flops, weight_bytes
from benchmarks.run import print_table
from pf2lora.precision import lower_precision

ROOT = Path(__file__).resolve().parents[1]


def test_flops_of_a_product_and_a_linear_layer() -> None:
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert flops(lambda: a @ b) == 2 * 8 * 16 * 4
    layer = torch.nn.Linear(16, 4)
    assert flops(lambda: layer(a).sum().backward()) == 2 * 2 * 8 * 16 * 4  # forward and the weight's gradient


def test_weight_bytes_count_what_decoding_reads() -> None:
    model = tiny_lm("llama", vocab=40)
    model.lm_head.weight = model.get_input_embeddings().weight  # tied: read whole, counted once
    embedding = model.get_input_embeddings().weight.numel() * 4
    other = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert weight_bytes(model) == other + embedding
    lower_precision(model, torch.bfloat16)  # the output layer's own bf16 copy; the table not read whole
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert weight_bytes(model) == 2 * linear + 4 * norms


def test_table_of_the_committed_results(capsys) -> None:
    print_table(json.loads((ROOT / "benchmarks" / "results.json").read_text()))
    assert "PF2LoRA first_order step / HOMLoRA step" in capsys.readouterr().out
