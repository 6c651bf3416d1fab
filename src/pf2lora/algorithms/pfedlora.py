"""pFedLoRA (Yi et al., arXiv 2310.13283; our reading, docs/design.md section 4): model-heterogeneous
clients sharing a homogeneous low-rank adapter, and the two baselines it is measured against.

Every client k has its own local model (any architecture) whose body gives a representation z of a
shared dimension d, then its own head. The adapter ``adapter(z) = B A z`` (A: r x d, B: C x r) has
the same shape everywhere; it is the only thing that travels. A round on client k:

1. the adapter frozen, I steps on the local model with ``(1 - mu) CE(head(z)) + mu CE(adapter(z))``
   (global knowledge flows into the local model);
2. the local model frozen, ``adapter_steps`` steps on the adapter with ``CE(adapter(z))`` (local
   knowledge flows into the adapter), which is sent back.

``pfedlora.objective=combined`` is the other reading of the method: both phases minimise
``CE((1 - mu) head(z) + mu adapter(z))``, the loss of the prediction itself, as a LoRA branch is
trained on the sum of its output and the frozen layer's (the separate losses are the default;
both are measured in ``docs/results/pfedlora_mnist.md``).

The server averages the adapters weighted by training-set size (FedAvg) over a fraction of clients
per round. Prediction: ``(1 - mu) head(z) + mu adapter(z)`` with the client's adapter as its last
round of local training left it (a client evaluates its own model after local training, as in
Yi et al.'s evaluation; one that has not trained yet uses the global adapter). The local model,
that adapter and the optimizer state stay on the client.

Baselines, on the same engine: ``local`` (each client trains its own model alone, nothing travels)
and ``fedavg`` (FedAvg of whole models; every client has the same architecture).

Each round's floating-point operations are counted by ``torch.utils.flop_counter`` while the
round runs (``metrics["flops"]``), so computation is measured, not estimated.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from pf2lora.algorithms.base import (
    Batch,
    ClientAlgorithm,
    ClientData,
    ClientState,
    Instruction,
    Params,
    TrainResult,
)
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.config import ExperimentConfig, PFedLoRAConfig, TrainConfig
from pf2lora.data.sampling import draw
from pf2lora.tasks.classification import Classification
from pf2lora.utils import generator, stable_seed
from pf2lora.zoo import LocalModel, ModelZoo

ADAPTER_A, ADAPTER_B = "adapter.A", "adapter.B"


def initial_adapter(rep_dim: int, num_classes: int, rank: int, seed: int) -> Params:
    """A ~ U(-1/sqrt(d), 1/sqrt(d)), B = 0 (LoRA's init: the adapter starts at zero)."""
    g = generator(seed, "adapter")
    a = (torch.rand(rank, rep_dim, generator=g) * 2 - 1) / rep_dim**0.5
    return {ADAPTER_A: a, ADAPTER_B: torch.zeros(num_classes, rank)}


def _cpu(params) -> Params:
    return {k: v.detach().cpu().clone() for k, v in params.items()}


def adapter_logits(z: Tensor, adapter: Params) -> Tensor:
    return z @ adapter[ADAPTER_A].T @ adapter[ADAPTER_B].T


def mixed_logits(z: Tensor, head_logits: Tensor, adapter: Params, mu: float) -> Tensor:
    """The prediction ``(1 - mu) head(z) + mu adapter(z)``."""
    return (1 - mu) * head_logits + mu * adapter_logits(z, {k: v.to(z.device) for k, v in adapter.items()})


class PFedLoRAServer(FedAvgServer):
    """FedAvg of the adapters, weighted by training examples (or uniform, as configured)."""


class HeterogeneousClient(ClientAlgorithm):
    """Shared machinery: each client's own model from the zoo, its optimizer state, batches, FLOPs."""

    sends_model = False  # fedavg: the whole model travels instead of an adapter

    def __init__(self, zoo: ModelZoo, train: TrainConfig, per: PFedLoRAConfig, seed: int = 0) -> None:
        self.zoo, self.cfg, self.per, self.seed = zoo, train, per, seed
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> HeterogeneousClient:
        self.device = device
        for module in self.zoo.modules.values():
            module.to(device)
        return self

    def init_state(self, client_id: int) -> ClientState:
        personal = {} if self.sends_model else self.zoo.initial_state(client_id)
        return {"cursor": {"epoch": 0, "pos": 0}, "optimizer": None, "personal": personal}

    def model(self, client_id: int, weights: Params) -> LocalModel:
        module = self.zoo.module(client_id)
        module.load_state_dict(weights)
        return module

    def next_batch(self, client_id: int, state: ClientState, data: ClientData):
        indices = draw(state["cursor"], len(data), self.cfg.batch_size, self.seed, "batches", client_id)
        return data.batch(indices, self.device)

    def train(
        self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData
    ) -> tuple[TrainResult, ClientState]:
        state = dict(state)
        torch.manual_seed(stable_seed(self.seed, "dropout", instruction.config.get("server_round", 0), client_id))
        counter = FlopCounterMode(display=False)
        with counter:
            params, loss = self.round(client_id, instruction, state, data)
        return TrainResult(params, len(data), {"train_loss": loss, "flops": counter.get_total_flops()}), state

    def local_phase(
        self, client_id: int, weights: Params, state: ClientState, data: ClientData, adapter: Params | None, mu: float
    ) -> tuple[LocalModel, float]:
        """I AdamW steps on the local model, loss ``(1 - mu) CE(head(z)) + mu CE(adapter(z))``."""
        model = self.model(client_id, weights)
        model.train(True)
        opt = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if state.get("optimizer") is not None and not self.cfg.reset_optimizer:
            opt.load_state_dict(state["optimizer"])
        losses = []
        for _ in range(self.cfg.local_steps):
            batch = self.next_batch(client_id, state, data)
            z, logits = model(batch)
            if adapter is None or mu == 0:
                loss = F.cross_entropy(logits, batch["labels"])
            elif self.per.objective == "combined":
                loss = F.cross_entropy(mixed_logits(z, logits, adapter, mu), batch["labels"])
            else:
                loss = (1 - mu) * F.cross_entropy(logits, batch["labels"]) + mu * F.cross_entropy(
                    adapter_logits(z, adapter), batch["labels"]
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        state["optimizer"] = opt.state_dict()
        return model, sum(losses) / len(losses)

    def round(
        self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData
    ) -> tuple[Params, float]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(
        self,
        client_id: int,
        instruction: Instruction,
        state: ClientState,
        data: ClientData,
        record: Path | None = None,
    ) -> dict[str, float]:
        """Classification metrics of the combined prediction (these methods classify only)."""
        weights = instruction.params if self.sends_model else state["personal"]
        model = self.model(client_id, weights)
        model.train(False)

        def forward(batch: Batch) -> Tensor:
            return self.combine(*model(batch), instruction.params)

        return Classification().evaluate(forward, data, self.cfg.eval_batch_size, self.device)

    def combine(self, z: Tensor, head_logits: Tensor, received: Params) -> Tensor:
        return head_logits


class PFedLoRAClient(HeterogeneousClient):
    """The iterative round: local model with the adapter frozen, then the adapter alone."""

    def round(
        self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData
    ) -> tuple[Params, float]:
        frozen = {k: v.to(self.device) for k, v in instruction.params.items()}
        model, loss = self.local_phase(client_id, state["personal"], state, data, frozen, self.per.mu)
        state["personal"] = _cpu(model.state_dict())
        model.train(False)  # the local model is frozen: no dropout while the adapter learns from it
        adapter = {k: v.clone().requires_grad_(True) for k, v in frozen.items()}
        opt = torch.optim.AdamW(adapter.values(), lr=self.per.adapter_lr, weight_decay=0.0)
        combined = self.per.objective == "combined"
        for _ in range(self.per.adapter_steps or self.cfg.local_steps):
            batch = self.next_batch(client_id, state, data)
            with torch.no_grad():
                z, head_logits = model(batch) if combined else (model.body(batch), None)
            out = self.combine(z, head_logits, adapter) if combined else adapter_logits(z, adapter)
            adapter_loss = F.cross_entropy(out, batch["labels"])
            opt.zero_grad(set_to_none=True)
            adapter_loss.backward()
            opt.step()
        state["adapter"] = _cpu(adapter)
        return _cpu(adapter), loss

    def evaluate(
        self,
        client_id: int,
        instruction: Instruction,
        state: ClientState,
        data: ClientData,
        record: Path | None = None,
    ) -> dict[str, float]:
        own = state.get("adapter")
        return super().evaluate(client_id, Instruction(own, instruction.config) if own else instruction, state, data)

    def combine(self, z: Tensor, head_logits: Tensor, adapter: Params) -> Tensor:
        return mixed_logits(z, head_logits, adapter, self.per.mu)


class LocalOnlyClient(HeterogeneousClient):
    """No federation: I steps on the client's own model per round; nothing travels."""

    def round(
        self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData
    ) -> tuple[Params, float]:
        model, loss = self.local_phase(client_id, state["personal"], state, data, None, 0.0)
        state["personal"] = _cpu(model.state_dict())
        return {}, loss


class FedAvgModelClient(HeterogeneousClient):
    """FedAvg of whole models: the global model arrives, I local steps, the whole model goes back."""

    sends_model = True

    def round(
        self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData
    ) -> tuple[Params, float]:
        model, loss = self.local_phase(client_id, instruction.params, state, data, None, 0.0)
        return _cpu(model.state_dict()), loss


# Builders for the method registry (the model-heterogeneous family): each gets the config, the
# clients' models (``zoo``) and the number of classes. FedAvg weights by training-set size.


def build_pfedlora(cfg: ExperimentConfig, zoo: ModelZoo, num_labels: int) -> tuple[PFedLoRAServer, PFedLoRAClient]:
    pf = cfg.pfedlora
    initial = initial_adapter(pf.rep_dim, num_labels, pf.adapter_rank, cfg.seed)
    server = PFedLoRAServer(initial, "weighted", cfg.train.client_fraction, cfg.seed)
    return server, PFedLoRAClient(zoo, cfg.train, pf, cfg.seed)


def build_local(cfg: ExperimentConfig, zoo: ModelZoo, num_labels: int) -> tuple[FedAvgServer, LocalOnlyClient]:
    """Nothing travels: the server holds no parameters."""
    server = FedAvgServer({}, "weighted", cfg.train.client_fraction, cfg.seed)
    return server, LocalOnlyClient(zoo, cfg.train, cfg.pfedlora, cfg.seed)


def build_fedavg(cfg: ExperimentConfig, zoo: ModelZoo, num_labels: int) -> tuple[FedAvgServer, FedAvgModelClient]:
    """One global model (``pfedlora.fedavg_model``) for everyone."""
    server = FedAvgServer(zoo.initial_state(0), "weighted", cfg.train.client_fraction, cfg.seed)
    return server, FedAvgModelClient(zoo, cfg.train, cfg.pfedlora, cfg.seed)
