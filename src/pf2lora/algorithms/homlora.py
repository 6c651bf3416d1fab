"""HOMLoRA: FedAvg over one LoRA of rank r (PF2LoRA paper, Section 3).

Each client runs I AdamW steps on its own data from the global adapter,
``x_k <- AdamW(x_k, grad F_k(x_k; xi))``; the server averages ``x = sum_k w_k x_k`` (A, B and the
shared head) and sends it back. Evaluation is the global model on each client's test split.
"""

from __future__ import annotations

from pf2lora.algorithms.base import ClientData, ClientState, Instruction, TrainResult
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.lora_client import LoRAClient
from pf2lora.utils import clone_params


class HomLoRAServer(FedAvgServer):
    """Averages the common adapter: ``x <- sum_k w_k x_k``."""


class HomLoRAClient(LoRAClient):
    """I local AdamW steps on the common adapter."""

    def train(
        self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData
    ) -> tuple[TrainResult, ClientState]:
        self.seed_round(client_id, instruction)
        self.model.train(True)
        x = self.leaves(instruction.params)
        opt = self.optimizer(x, state)
        losses = []
        for _ in range(self.cfg.local_steps):
            batch = self.next_batch(client_id, state, data, self.cfg.batch_size)
            loss = self.model.loss(x, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        state = {**state, "optimizer": opt.state_dict()}
        metrics = {"train_loss": sum(losses) / len(losses)}
        return TrainResult(clone_params(x), len(data), metrics), state
