"""FedAvg over named tensors, the server side shared by HOMLoRA and PF2LoRA.

``x <- sum_k w_k x_k`` with ``w_k = 1/|S|`` (uniform, the paper's choice) or
``w_k = n_k / sum_j n_j`` (weighted by training examples), over the clients S that replied.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pf2lora.algorithms.base import Instruction, Params, ServerAlgorithm, TrainResult
from pf2lora.utils import clone_params, generator, weighted_average


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many clients a round samples: ``ceil(fraction * M)``, at least one."""
    return num_clients if fraction >= 1.0 else max(1, math.ceil(fraction * num_clients))


def sample_clients(client_ids: list[int], fraction: float, *seed: object) -> list[int]:
    """A seeded subset of ``ceil(fraction * len(client_ids))`` clients (all when fraction is 1)."""
    if fraction >= 1.0:
        return list(client_ids)
    count = clients_per_round(len(client_ids), fraction)
    order = torch.randperm(len(client_ids), generator=generator(*seed)).tolist()
    return sorted(client_ids[i] for i in order[:count])


class FedAvgServer(ServerAlgorithm):
    """Sends every sampled client the same global parameters and averages what comes back."""

    def __init__(
        self, initial: Params, aggregation: str = "uniform", client_fraction: float = 1.0, seed: int = 0
    ) -> None:
        self._params = clone_params(initial)
        self.aggregation = aggregation
        self.client_fraction = client_fraction
        self.seed = seed

    @property
    def global_params(self) -> Params:
        return self._params

    def state(self) -> dict[str, Any]:
        return {"params": self._params}

    def load_state(self, state: dict[str, Any]) -> None:
        self._params = clone_params(state["params"])

    def configure_train(self, server_round: int, client_ids: list[int]) -> dict[int, Instruction]:
        chosen = sample_clients(client_ids, self.client_fraction, self.seed, "clients", server_round)
        return {cid: Instruction(self._params, {"server_round": server_round}) for cid in chosen}

    def weights(self, replies: list[TrainResult]) -> list[float]:
        """Each reply's weight: 1 (uniform) or its number of training examples (weighted)."""
        return [r.num_examples if self.aggregation == "weighted" else 1.0 for r in replies]

    def aggregate_train(self, server_round: int, results: dict[int, TrainResult]) -> None:
        if not results:
            return
        replies = [results[cid] for cid in sorted(results)]
        self._params = weighted_average([r.params for r in replies], self.weights(replies))

    def configure_evaluate(self, server_round: int, client_ids: list[int]) -> dict[int, Instruction]:
        return {cid: Instruction(self._params, {"server_round": server_round}) for cid in client_ids}
