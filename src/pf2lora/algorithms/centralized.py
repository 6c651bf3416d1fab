"""Centralized LoRA (PF2LoRA paper, Section 6): the reference upper bound of the paper's tables.

All clients' training data pooled, one LoRA of rank r trained with AdamW for the same total number
of optimizer steps as the federation takes (R rounds x I local steps x the clients of a round),
on minibatches of the same size; the result is evaluated on every client's own test split. It
runs on the same engine as one "client" holding the pooled data, training I x (clients per
round) steps per round, so its per-round evaluations line up with the federated methods'.
Nothing travels, so it communicates nothing.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.fedavg import FedAvgServer, clients_per_round
from pf2lora.algorithms.homlora import HomLoRAClient
from pf2lora.algorithms.lora_client import lora_model
from pf2lora.config import ExperimentConfig, TrainConfig
from pf2lora.tasks.base import Task


class CentralizedServer(FedAvgServer):
    """Holds the one model; its single "client" is the pooled data."""

    def __init__(self, initial, seed: int = 0) -> None:
        super().__init__(initial, "uniform", 1.0, seed)


class CentralizedClient(HomLoRAClient):
    """Plain AdamW steps on the pooled data."""


def centralized_train_config(train: TrainConfig, num_clients: int) -> TrainConfig:
    """The federation's optimizer steps per round, taken by one learner on the pooled data."""
    steps = train.local_steps * clients_per_round(num_clients, train.client_fraction)
    return dataclasses.replace(train, local_steps=steps, client_fraction=1.0)


def build(
    cfg: ExperimentConfig, base: nn.Module, task: Task
) -> tuple[CentralizedServer, CentralizedClient, TwoLevelModel]:
    """One client holding every client's training data (the registry marks the method pooled)."""
    model = lora_model(cfg, base, task)
    train = centralized_train_config(cfg.train, cfg.data.num_clients)
    return CentralizedServer(model.initial_common(), cfg.seed), CentralizedClient(model, train, cfg.seed), model
