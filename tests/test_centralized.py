"""Centralized LoRA: every client's training data pooled, the federation's number of optimizer
steps, evaluated on every client's own test split."""

from __future__ import annotations

import torch
from conftest import tiny_bert

from pf2lora.algorithms.centralized import centralized_train_config
from pf2lora.config import ExperimentConfig, TrainConfig
from pf2lora.data.text import TokenizedData
from pf2lora.engines.local import LocalEngine
from pf2lora.methods import build_algorithm, get
from pf2lora.tasks.classification import Classification


def _client(n: int, label: int, offset: int) -> TokenizedData:
    ids = [[offset + i % 50 + 1, 2, 3] for i in range(n)]
    return TokenizedData(ids, None, torch.full((n,), label).numpy(), 0)


def test_pool_keeps_every_example_in_client_order() -> None:
    parts = [_client(3, 0, 0), _client(5, 1, 10), _client(2, 2, 20)]
    pooled = TokenizedData.pool(parts)
    assert len(pooled) == 10
    assert pooled.ids == parts[0].ids + parts[1].ids + parts[2].ids
    assert pooled.labels.tolist() == [0] * 3 + [1] * 5 + [2] * 2


def test_same_total_number_of_optimizer_steps() -> None:
    train = TrainConfig(rounds=3, local_steps=10)
    assert centralized_train_config(train, 8).local_steps == 80
    assert centralized_train_config(TrainConfig(local_steps=10, client_fraction=0.5), 8).local_steps == 40
    assert centralized_train_config(TrainConfig(local_steps=10, client_fraction=0.5), 8).client_fraction == 1.0


def test_centralized_trains_on_pooled_data_and_evaluates_every_client() -> None:
    cfg = ExperimentConfig()
    cfg.data.num_clients = 3
    cfg.lora.rank, cfg.lora.lora_alpha = 4, 8
    cfg.train.rounds, cfg.train.local_steps, cfg.train.batch_size = 2, 2, 4
    assert get("centralized").pooled and not get("centralized").federated
    server, client, _ = build_algorithm("centralized", cfg, tiny_bert(), Classification())
    clients = [_client(6, c, 10 * c) for c in range(3)]
    seen: list[int] = []
    batch = client.next_batch
    client.next_batch = lambda cid, state, data, count: seen.append(len(data)) or batch(cid, state, data, count)
    engine = LocalEngine(server, client, [TokenizedData.pool(clients)], clients)
    records: list[dict] = []
    metrics, _ = engine.run(cfg.train.rounds, on_round=records.append)
    assert engine.train_ids == [0] and set(metrics) == {0, 1, 2}  # one learner, three evaluated clients
    assert seen == [18] * (2 * 2 * 3)  # every draw from the 18 pooled examples, R x I x M steps
    steps = engine.states[0]["optimizer"]["state"][0]["step"]
    assert int(steps) == 2 * 2 * 3
    assert all(list(r["clients"]) == [0] for r in records)
