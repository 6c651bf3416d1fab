"""Shared fixtures: tiny models built from a config (seconds), offline Hugging Face."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one core as far as pf2lora can tell: the local engine trains in this process (train.workers unset
# means one worker per core); the worker tests ask for workers explicitly, and the default
# experiment's test runs `make run`'s command in a process of its own, on every core
os.environ["PF2LORA_CORES"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs the suite in one pytest-xdist worker per core: each worker's torch gets its share
# of the cores, so that two workers do not fight over them (on small tensors that costs far more
# than it saves)
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from pf2lora.adapters.two_level import TwoLevelModel  # noqa: E402
from pf2lora.tasks.classification import Classification  # noqa: E402


def tiny_bert(num_labels: int = 3, dropout: float = 0.0, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config)


def tiny_two_level(personal_rank: int = 2, dtype: torch.dtype = torch.float64, **kw) -> TwoLevelModel:
    base = tiny_bert(**kw).to(dtype)
    return TwoLevelModel(
        base,
        Classification(),
        ["query", "value"],
        rank=4,
        lora_alpha=8,
        personal_rank=personal_rank,
        personal_lora_alpha=4,
    )


def random_batch(size: int = 6, length: int = 7, num_labels: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 60, (size, length), generator=g),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (size,), generator=g),
    }


def token_clients(m: int = 3, n: int = 24) -> list:
    """M clients of n random 5-token examples; client c's label is c mod 3."""
    from pf2lora.data.text import TokenizedData

    g = torch.Generator().manual_seed(11)
    return [
        TokenizedData(torch.randint(1, 60, (n, 5), generator=g).tolist(), None, torch.full((n,), c % 3).numpy(), 0)
        for c in range(m)
    ]


@pytest.fixture
def tiny_model() -> TwoLevelModel:
    return tiny_two_level()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT of width 32 with the bundled tokenizer, saved like any pretrained model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pf2lora.models import resolve

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve("bundled"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)  # no head: each run adds its own
    tokenizer.save_pretrained(folder)
    return folder


# the training settings of the tiny integration runs (a few seconds per method on tiny_model_dir)
TINY_TRAIN = [
    "train.local_steps=2",
    "train.batch_size=4",
    "train.threads=1",
    "lora.rank=4",
    "lora.personal_rank=2",
    "hetlora.r_min=2",
    "hetlora.r_max=4",
]
