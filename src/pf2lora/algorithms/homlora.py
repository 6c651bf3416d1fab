"""HOMLoRA: FedAvg over one LoRA of rank r (PF2LoRA paper, Section 3).

Each client runs I AdamW steps on its own data from the global adapter,
``x_k <- AdamW(x_k, grad F_k(x_k; xi))``; the server averages ``x = sum_k w_k x_k`` (A, B and the
shared head) and sends it back. Evaluation is the global model on each client's test split.
"""

from __future__ import annotations

from torch import Tensor, nn

from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.base import ClientData, ClientState
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.lora_client import LoRAClient, lora_model
from pf2lora.config import ExperimentConfig
from pf2lora.tasks.base import Task


class HomLoRAServer(FedAvgServer):
    """Averages the common adapter: ``x <- sum_k w_k x_k``."""


class HomLoRAClient(LoRAClient):
    """I local AdamW steps on the common adapter."""

    def local_step(self, client_id: int, x: dict[str, Tensor], state: ClientState, data: ClientData) -> float:
        loss = self.model.loss(x, self.next_batch(client_id, state, data, self.cfg.batch_size))
        loss.backward()
        return loss.item()


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[HomLoRAServer, HomLoRAClient, TwoLevelModel]:
    model = lora_model(cfg, base, task)
    t = cfg.train
    return (
        HomLoRAServer(model.initial_common(), t.aggregation, t.client_fraction, cfg.seed),
        HomLoRAClient(model, t, cfg.seed),
        model,
    )
