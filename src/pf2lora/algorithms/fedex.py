"""FedEx-LoRA (Singhal et al., ACL 2025, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models"): FedAvg over LoRA made exact.

Averaging A and B apart is not averaging the clients' models: ``mean(B_k) mean(A_k) !=
mean(B_k A_k)``. FedEx-LoRA averages both factors as HOMLoRA does and folds what is left over
into the frozen base weight, per target module:

    A <- sum_k w_k A_k,   B <- sum_k w_k B_k
    W0 <- W0 + s (sum_k w_k B_k A_k - B A)                        (the residual, full rank)

so that the global model ``W0 + s B A`` is the weighted average of the clients' models
``W0 + s B_k A_k``, to float precision. The head is averaged with the same weights (linear, so
exact too). The residual is a dense m x n change per module: the server keeps its sum over
rounds and sends it with A and B (clients use it, never train it); that costs what a full
fine-tuning message of the adapted layers costs, as the paper states. ``w_k``:
``train.aggregation``.
"""

from __future__ import annotations

import torch
from torch import nn

from pf2lora.adapters.two_level import COMMON, AdapterLayout, TwoLevelModel, base_delta_name
from pf2lora.algorithms.base import Instruction, TrainResult, structure_problem
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.lora_client import SplitLoRAClient, lora_model
from pf2lora.config import ExperimentConfig
from pf2lora.tasks.base import Task
from pf2lora.utils import average_product, weighted_average


def is_residual(name: str) -> bool:
    return name.endswith(".base_delta")


class FedExLoRAServer(FedAvgServer):
    """FedAvg of A, B and the head, plus the residual folded into the base weight."""

    def __init__(self, initial, layout: AdapterLayout, base_weights: dict[str, torch.Tensor], **kwargs) -> None:
        residual = {base_delta_name(m): torch.zeros_like(base_weights[m]) for m in layout.modules}
        super().__init__({**initial, **residual}, **kwargs)
        self.layout = layout

    def check_reply(self, instruction: Instruction, reply: TrainResult) -> str | None:
        """A client returns what it trains: everything it was sent but the residual."""
        trained = {k: v for k, v in instruction.params.items() if not is_residual(k)}
        return structure_problem(trained, reply.params)

    def aggregate_train(self, server_round: int, results: dict[int, TrainResult]) -> None:
        if not results:
            return
        replies = [results[cid] for cid in sorted(results)]
        weights = self.weights(replies)
        averaged = weighted_average([r.params for r in replies], weights)
        new = dict(self._params)
        new.update(averaged)
        s = self.layout.scaling
        for m in self.layout.modules:
            a, b = f"{m}.lora_A.{COMMON}.weight", f"{m}.lora_B.{COMMON}.weight"
            products = average_product([r.params for r in replies], weights, b, a)
            residual = s * (products - averaged[b].double() @ averaged[a].double())
            name = base_delta_name(m)
            new[name] = (self._params[name].double() + residual).to(self._params[name].dtype)
        self._params = new


class FedExLoRAClient(SplitLoRAClient):
    """HOMLoRA's local training on the base weight with the residual added (received, not trained)."""

    def held(self, name: str) -> bool:
        return is_residual(name)


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[FedExLoRAServer, FedExLoRAClient, TwoLevelModel]:
    model = lora_model(cfg, base, task)
    t = cfg.train
    weights = {m: model.base_weight(m) for m in model.layout.modules}
    server = FedExLoRAServer(
        model.initial_common(),
        model.layout,
        weights,
        aggregation=t.aggregation,
        client_fraction=t.client_fraction,
        seed=cfg.seed,
    )
    return server, FedExLoRAClient(model, t, cfg.seed), model
