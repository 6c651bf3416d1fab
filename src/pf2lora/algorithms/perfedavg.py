"""Per-FedAvg-LoRA (PF2LoRA paper, Appendix A; Per-FedAvg, Fallah et al. 2020): MAML over one LoRA.

The common adapter x (A, B and the shared head) solves ``min_x (1/M) sum_k f_k(x - alpha grad f_k(x))``:
a good starting point for one SGD step on each client. A local step with three independent
minibatches D, D', D'' of the client's data:

    x'      = x - alpha * grad f(x; D)                                       (SGD, not applied)
    g       = grad f(x'; D')                                                 (first_order)
    g       = (I - alpha * grad2 f(x; D'')) grad f(x'; D')                   (hessian_vector)
    x      <- AdamW(x, g)

Modes of ``perfedavg.hessian``: ``first_order`` (Per-FedAvg FO, 2 passes); ``exact`` (the
Hessian-vector product by double backward, 3 passes + one double backward); ``finite_difference``
(Per-FedAvg HF: ``[grad f(x + d v; D'') - grad f(x - d v; D'')] / 2d``, both passes with the same
dropout masks, 4 passes). The server averages x (FedAvg). Evaluation personalises first: one SGD
step of lr alpha on a minibatch of the client's own training data, then the test split.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pf2lora.adapters.dropout import DropoutMasks
from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.base import Batch, ClientData, ClientState, Instruction, Params
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.lora_client import LoRAClient, lora_model
from pf2lora.config import ExperimentConfig, PerFedAvgConfig, TrainConfig
from pf2lora.data.sampling import draw
from pf2lora.precision import fd_epsilon
from pf2lora.tasks.base import Task
from pf2lora.utils import fork_rng, l2_norm, rng_state, stable_seed


class PerFedAvgServer(FedAvgServer):
    """Averages the meta-learned common adapter: ``x <- sum_k w_k x_k``."""


class PerFedAvgClient(LoRAClient):
    """Local MAML steps on x; personalisation by one SGD step before evaluation."""

    def __init__(self, model, train: TrainConfig, per: PerFedAvgConfig, seed: int = 0) -> None:
        super().__init__(model, train, seed)
        self.per = per

    def local_step(self, client_id: int, x: dict[str, Tensor], state: ClientState, data: ClientData) -> float:
        b = self.cfg.batch_size
        d1 = self.next_batch(client_id, state, data, b)
        d2 = self.next_batch(client_id, state, data, b)
        d3 = self.next_batch(client_id, state, data, b) if self.per.hessian != "first_order" else None
        loss, g = self.meta_gradient(x, d1, d2, d3)
        for k, leaf in x.items():
            leaf.grad = g[k]
        return loss

    def meta_gradient(
        self, x: dict[str, Tensor], d1: Batch, d2: Batch, d3: Batch | None = None
    ) -> tuple[float, dict[str, Tensor]]:
        """The gradient of ``x -> f(x - alpha grad f(x; d1); d2)`` (its Hessian term on ``d3``).
        Returns (loss at (x, d1), gradient)."""
        names, alpha = list(x), self.per.alpha
        loss1 = self.model.loss(x, d1)
        g1 = torch.autograd.grad(loss1, [x[k] for k in names])
        inner = {k: (x[k].detach() - alpha * g).requires_grad_(True) for k, g in zip(names, g1, strict=True)}
        g2 = torch.autograd.grad(self.model.loss(inner, d2), [inner[k] for k in names])
        outer = dict(zip(names, g2, strict=True))
        if self.per.hessian == "first_order" or d3 is None:
            return loss1.item(), outer
        hv = self.hessian_vector(x, outer, d3)
        return loss1.item(), {k: outer[k] - alpha * hv[k] for k in names}

    def hessian_vector(self, x: dict[str, Tensor], v: dict[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """``grad2 f(x; batch) v``: double backward (exact) or a central difference along v."""
        names = list(x)
        point = {k: x[k].detach().requires_grad_(True) for k in names}
        if self.per.hessian == "exact":
            with self.model.twice_differentiable():
                grads = torch.autograd.grad(self.model.loss(point, batch), [point[k] for k in names], create_graph=True)
                dot = sum((g * v[k]).sum() for g, k in zip(grads, names, strict=True))
                hv = torch.autograd.grad(dot, [point[k] for k in names], allow_unused=True)
            return {k: torch.zeros_like(x[k]) if h is None else h for k, h in zip(names, hv, strict=True)}
        norm = l2_norm(v)
        if norm == 0:
            return {k: torch.zeros_like(x[k]) for k in names}
        eps = fd_epsilon(self.cfg.fd_epsilon, self.model, x) / norm
        device = self.model.device
        rng, masks = rng_state(device), DropoutMasks()
        out = []
        with fork_rng(device):  # the same dropout masks at both points, drawn once
            for sign, masked in ((1.0, masks.record()), (-1.0, masks.replay(rng, device))):
                moved = {k: (x[k].detach() + sign * eps * v[k]).requires_grad_(True) for k in names}
                with masked:
                    loss = self.model.loss(moved, batch)
                out.append(torch.autograd.grad(loss, [moved[k] for k in names]))
        return {k: (gp - gm) / (2 * eps) for k, gp, gm in zip(names, out[0], out[1], strict=True)}

    # ------------------------------------------------------------------ evaluation
    def personalize(
        self, client_id: int, instruction: Instruction, state: ClientState, train_data: ClientData | None
    ) -> Instruction:
        """One SGD step of lr alpha on a seeded minibatch of this client's training data (the client's
        sampling cursor is left untouched, so evaluating does not change training)."""
        if train_data is None or len(train_data) == 0:
            return instruction
        round_ = instruction.config.get("server_round", 0)
        indices = draw({}, len(train_data), min(self.cfg.batch_size, len(train_data)), self.seed, "adapt", client_id)
        device = self.model.device
        with fork_rng(device):
            torch.manual_seed(stable_seed(self.seed, "adapt-dropout", round_, client_id))
            self.model.train(True)
            x = self.leaves(instruction.params)
            loss = self.model.loss(x, train_data.batch(indices, device))
            grads = torch.autograd.grad(loss, list(x.values()))
        adapted: Params = {k: (x[k] - self.per.alpha * g).detach() for k, g in zip(x, grads, strict=True)}
        return Instruction(adapted, instruction.config)


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[PerFedAvgServer, PerFedAvgClient, TwoLevelModel]:
    model = lora_model(cfg, base, task)
    t = cfg.train
    return (
        PerFedAvgServer(model.initial_common(), t.aggregation, t.client_fraction, cfg.seed),
        PerFedAvgClient(model, t, cfg.perfedavg, cfg.seed),
        model,
    )
