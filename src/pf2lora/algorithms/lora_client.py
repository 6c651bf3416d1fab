"""What every LoRA client shares: leaves for x, its AdamW state, minibatch draws, evaluation."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import torch
from torch import Tensor, nn

from pf2lora.adapters.rank import effective_ranks
from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.base import (
    AdapterModel,
    ClientAlgorithm,
    ClientData,
    ClientState,
    Instruction,
    Params,
    TrainResult,
)
from pf2lora.config import ExperimentConfig, TrainConfig
from pf2lora.data.sampling import draw
from pf2lora.tasks.base import Task
from pf2lora.utils import clone_params, stable_seed


def lora_model(
    cfg: ExperimentConfig,
    base: nn.Module,
    task: Task,
    *,
    personal: bool = False,
    rank: int | None = None,
    lora_alpha: float | None = None,
    head: str | None = None,
) -> TwoLevelModel:
    """``base`` wrapped with the configured two-level adapter: the common level of rank
    ``lora.rank`` (or ``rank``), and the personal level of rank ``lora.personal_rank`` where the
    method has one (``personal``); the head where ``lora.head`` puts it (or ``head``). ``task``
    names the head, the loss and the metrics."""
    lo = cfg.lora
    return TwoLevelModel(
        base,
        task,
        lo.target_modules,
        rank=lo.rank if rank is None else rank,
        lora_alpha=lo.lora_alpha if lora_alpha is None else lora_alpha,
        personal_rank=lo.personal_rank if personal else 0,
        personal_lora_alpha=lo.personal_lora_alpha,
        head=lo.head if head is None else head,
        dtype=cfg.model.dtype,
    )


class LoRAClient(ClientAlgorithm):
    """Base of the LoRA clients: the round loop. Subclasses implement ``local_step``.

    A round: seed the dropout RNG from (seed, round, client); fresh leaves for the received x;
    this client's AdamW on x; I local steps, each leaving its gradient in x's ``.grad``; then x
    (as ``end_round`` shapes it) goes back with the metrics, and the new state stays here.
    """

    def __init__(self, model: AdapterModel, train: TrainConfig, seed: int = 0) -> None:
        self.model = model
        self.cfg = train
        self.seed = seed

    def train(
        self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData
    ) -> tuple[TrainResult, ClientState]:
        self.seed_round(client_id, instruction)
        self.model.train(True)
        x = self.leaves(instruction.params)
        state = self.begin_round(instruction, x, dict(state))
        opt = self.optimizer(x, state)
        losses = []
        for _ in range(self.cfg.local_steps):
            losses.append(self.local_step(client_id, x, state, data))
            opt.step()
            opt.zero_grad(set_to_none=True)
        state["optimizer"] = opt.state_dict()
        params, metrics = self.end_round(instruction, x, state)
        return TrainResult(params, len(data), {"train_loss": sum(losses) / len(losses), **metrics}), state

    @abstractmethod
    def local_step(self, client_id: int, x: dict[str, Tensor], state: ClientState, data: ClientData) -> float:
        """One local step: set every ``x[k].grad``, update the rest of ``state``; return the loss."""

    def begin_round(self, instruction: Instruction, x: dict[str, Tensor], state: ClientState) -> ClientState:
        return state

    def end_round(
        self, instruction: Instruction, x: dict[str, Tensor], state: ClientState
    ) -> tuple[Params, dict[str, float]]:
        """What is sent back (x itself by default) and extra metrics."""
        return clone_params(x), {}

    # ------------------------------------------------------------------ state
    def init_state(self, client_id: int) -> ClientState:
        return {"cursor": {"epoch": 0, "pos": 0}, "optimizer": None}

    def personal(self, state: ClientState) -> Params:
        return state.get("personal", {})

    # ------------------------------------------------------------------ helpers
    def leaves(self, params: Params) -> dict[str, Tensor]:
        """Fresh leaf tensors (``requires_grad``) holding a copy of ``params``."""
        return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    def optimizer(self, x: dict[str, Tensor], state: ClientState) -> torch.optim.AdamW:
        """AdamW over x (sorted by name), resuming this client's moments unless reset each round."""
        opt = torch.optim.AdamW([x[k] for k in sorted(x)], lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        if state.get("optimizer") is not None and not self.cfg.reset_optimizer:
            opt.load_state_dict(state["optimizer"])
        return opt

    def next_batch(self, client_id: int, state: ClientState, data: ClientData, count: int):
        indices = draw(state["cursor"], len(data), count, self.seed, "batches", client_id)
        return data.batch(indices, self.model.device)

    def seed_round(self, client_id: int, instruction: Instruction) -> None:
        """Seed torch's global RNG (dropout) from (seed, round, client): same on every engine."""
        torch.manual_seed(stable_seed(self.seed, "dropout", instruction.config.get("server_round", 0), client_id))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(
        self,
        client_id: int,
        instruction: Instruction,
        state: ClientState,
        data: ClientData,
        record: Path | None = None,
    ) -> dict[str, float]:
        self.model.train(False)
        params = {**instruction.params, **self.personal(state)}
        return self.model.evaluate(params, data, self.cfg.eval_batch_size, record)

    def effective_ranks(self, instruction: Instruction, state: ClientState) -> dict[str, int]:
        return effective_ranks(self.model.layout, {**instruction.params, **self.personal(state)})


class SplitLoRAClient(LoRAClient):
    """A client that trains more, or less, than what it receives, with one AdamW.

    Of the received tensors, those :meth:`held` are used but not trained this round (FedEx-LoRA's
    base-weight residual); its personal tensors (``state["personal"]``) are trained beside the
    rest and stay here (FedSA-LoRA's B); ``constants`` are tensors every client holds from the
    start and never trains nor sends (FFA-LoRA's A). What goes back is the received, trained part.
    """

    def __init__(self, model: AdapterModel, train: TrainConfig, seed: int = 0, constants: Params | None = None) -> None:
        super().__init__(model, train, seed)
        self.constants = clone_params(constants or {})

    def held(self, name: str) -> bool:
        """Whether the received tensor ``name`` is used as is, not trained."""
        return False

    def begin_round(self, instruction: Instruction, x: dict[str, Tensor], state: ClientState) -> ClientState:
        held = {k: x.pop(k).detach() for k in sorted(x) if self.held(k)}
        state["round"] = {"held": held, "sent": sorted(x)}
        x.update(self.leaves(self.personal(state)))  # trained beside the rest by the same AdamW
        return state

    def params(self, x: dict[str, Tensor], state: ClientState) -> Params:
        """Every tensor the model is evaluated at this round."""
        return {**self.constants, **state["round"]["held"], **x}

    def local_step(self, client_id: int, x: dict[str, Tensor], state: ClientState, data: ClientData) -> float:
        loss = self.model.loss(self.params(x, state), self.next_batch(client_id, state, data, self.cfg.batch_size))
        loss.backward()
        return loss.item()

    def end_round(
        self, instruction: Instruction, x: dict[str, Tensor], state: ClientState
    ) -> tuple[Params, dict[str, float]]:
        sent = set(state.pop("round")["sent"])
        if self.personal(state):
            state["personal"] = {k: x[k].detach().clone() for k in x if k not in sent}
        return {k: x[k].detach().clone() for k in sorted(sent)}, {}

    def personalize(
        self, client_id: int, instruction: Instruction, state: ClientState, train_data: ClientData | None
    ) -> Instruction:
        """The model this client evaluates holds the constants too."""
        if not self.constants:
            return instruction
        return Instruction({**self.constants, **instruction.params}, instruction.config)
