"""The algorithm contract: a server part and a client part that never know which engine runs them.

The engine moves parameters and keeps client state; the algorithm computes. Server hooks follow
Flower's strategy shape (``configure_train`` / ``aggregate_train`` / ``configure_evaluate``);
clients are stateless objects that take their state in and give it back, so the engine may hold
it in memory, on disk, or in a Flower ``Context``. No file I/O, logging of results, or device
selection happens here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from pf2lora.adapters.two_level import AdapterLayout

Params = dict[str, Tensor]
Batch = Mapping[str, Tensor]
ClientState = dict[str, Any]


class AdapterModel(Protocol):
    """A frozen model evaluated at the adapter tensors passed in by name (see TwoLevelModel).

    The algorithms need nothing else of a model, so the same code trains a transformer with
    PEFT adapters on any task (the loss and the metrics are the task's) and the linear model of
    the synthetic experiment.
    """

    layout: AdapterLayout

    @property
    def device(self) -> torch.device: ...

    def train(self, mode: bool = True) -> None: ...

    def loss(self, params: Params, batch: Batch, reduction: str = "mean") -> Tensor: ...

    def evaluate(self, params: Params, data: Any, batch_size: int, record: Path | None = None) -> dict[str, float]: ...

    def initial_common(self) -> Params: ...

    def initial_personal(self, generator: torch.Generator) -> Params: ...

    def twice_differentiable(self) -> AbstractContextManager[Any]: ...


class ClientData(Protocol):
    """What an algorithm needs of a client's dataset."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int], device: torch.device | None = None) -> Batch: ...


@dataclass
class Instruction:
    """What the server sends one client for one round."""

    params: Params
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What one client sends back after local training."""

    params: Params
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class ServerAlgorithm(ABC):
    """Holds the global parameters; builds each client's instruction; aggregates replies."""

    @abstractmethod
    def configure_train(self, server_round: int, client_ids: list[int]) -> dict[int, Instruction]: ...

    @abstractmethod
    def aggregate_train(self, server_round: int, results: dict[int, TrainResult]) -> None: ...

    @abstractmethod
    def configure_evaluate(self, server_round: int, client_ids: list[int]) -> dict[int, Instruction]: ...

    def check_reply(self, instruction: Instruction, reply: TrainResult) -> str | None:
        """Why ``reply`` is not a well-formed answer to ``instruction`` (None: it is). By default it
        returns what it was sent: the same names, shapes and dtypes. The engines also reject
        non-finite values and updates beyond ``train.update_norm_bound``
        (:mod:`pf2lora.algorithms.validation`)."""
        return structure_problem(instruction.params, reply.params)

    @property
    @abstractmethod
    def global_params(self) -> Params: ...

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything this server carries from one round to the next (its global parameters, and
        what else it learns, such as HETLoRA's client ranks), for the round's checkpoint."""

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Go on from what :meth:`state` returned (a resumed run)."""


class ClientAlgorithm(ABC):
    """Local training and evaluation for one client at a time, state in and state out."""

    @abstractmethod
    def init_state(self, client_id: int) -> ClientState: ...

    @abstractmethod
    def train(
        self, client_id: int, instruction: Instruction, state: ClientState, data: ClientData
    ) -> tuple[TrainResult, ClientState]: ...

    @abstractmethod
    def evaluate(
        self,
        client_id: int,
        instruction: Instruction,
        state: ClientState,
        data: ClientData,
        record: Path | None = None,
    ) -> dict[str, float]:
        """The task's metrics of this client's model on ``data``, computed here: only numbers leave.
        ``record``: a file on the client for the task's per-example outputs (generated text)."""

    def personalize(
        self, client_id: int, instruction: Instruction, state: ClientState, train_data: ClientData | None
    ) -> Instruction:
        """The model this client evaluates, from what the server sent (as is, unless the method adapts
        it to the client's training data first, as Per-FedAvg does)."""
        return instruction

    def effective_ranks(self, instruction: Instruction, state: ClientState) -> dict[str, int]:
        """Effective rank per adapted module of this client's model (empty if not applicable)."""
        return {}

    def exported(self, instruction: Instruction, state: ClientState) -> Params:
        """The tensors of the model this client keeps as a stock adapter: what it evaluates
        (``instruction``, from :meth:`personalize`) with its personal part."""
        return {**instruction.params, **state.get("personal", {})}


def structure_problem(expected: Params, got: Params) -> str | None:
    """Why ``got`` does not have the names, shapes and dtypes of ``expected`` (None: it has)."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        return f"missing {_names(missing)}"
    if extra:
        return f"unexpected {_names(extra)}"
    for name, value in expected.items():
        other = got[name]
        if not isinstance(other, torch.Tensor):
            return f"{name} is not a tensor"
        if other.shape != value.shape:
            return f"{name} has shape {tuple(other.shape)}, expected {tuple(value.shape)}"
        if other.dtype != value.dtype:
            return f"{name} has dtype {_dtype(other.dtype)}, expected {_dtype(value.dtype)}"
    return None


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")
