"""The task contract: what differs between kinds of fine-tuning, behind one small interface.

A task owns the model class and which of its parameters form the head, how a configuration's data
becomes each client's batches, the loss, how a client evaluates (on the client, from the model's
outputs; only metric values leave it, never logits), the metric names that reports, plots and
``compare --metric`` show, and which of them is primary. Algorithms and engines never look inside:
they call ``loss`` and ``evaluate`` through the adapter model, and read metric names from here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pf2lora.config import ExperimentConfig
    from pf2lora.data.text import FederatedData

Batch = Mapping[str, Tensor]
Forward = Callable[[Batch], Any]  # a batch -> the model's output (logits, start/end logits, ...)


class ClientData(Protocol):
    """A client's examples, as the algorithms see them: a length and batches by index."""

    def __len__(self) -> int: ...

    def batch(self, indices: list[int], device: torch.device | None = None) -> Batch: ...


class Task(ABC):
    """One kind of fine-tuning. An instance is bound to its data (e.g. the number of labels)."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # what evaluate returns besides loss and num_examples
    primary: ClassVar[str]  # the metric tables, plots and compare show by default
    head_candidates: ClassVar[tuple[str, ...]]  # top-level module names of the task head
    input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
    records: ClassVar[str] = "predictions"  # the run's folder for per-example outputs (evaluate's record)
    peft_task_type: ClassVar[str | None] = None  # PEFT's task type of an exported adapter (CAUSAL_LM, ...)

    @classmethod
    @abstractmethod
    def build(cls, cfg: ExperimentConfig, tokenizer: Any) -> tuple[Task, FederatedData]:
        """Load, split and partition ``cfg``'s data into clients; the task bound to that data.
        Raises ConfigError on bad input, before any model is trained."""

    @abstractmethod
    def load_model(self, name: str, dropout: float | None = None) -> nn.Module:
        """The pretrained model with this task's head (freshly initialised where it is new)."""

    def check_model(self, model: nn.Module, tokenizer: Any) -> None:
        """Raise ConfigError where ``model`` cannot serve this task (called once, before training)."""
        find_head(model, self.head_candidates)

    @abstractmethod
    def loss(self, outputs: Any, batch: Batch, reduction: str = "mean") -> Tensor:
        """The training loss of a batch from the model's outputs (``reduction``: mean | sum)."""

    @abstractmethod
    def evaluate(
        self, forward: Forward, data: Any, batch_size: int, device: torch.device, record: Path | None = None
    ) -> dict[str, float]:
        """This task's metrics on ``data``, plus ``loss`` (mean per example) and ``num_examples``.
        ``forward(batch)`` gives the model's outputs (and ``forward.generate(...)``, where the model
        generates, transformers' ``generate`` through the same adapters); ``record``: where to
        write per-example outputs (generated text, predicted answers), for tasks that keep them."""

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        """The keys of a batch that the model takes (targets stay with the task's loss)."""
        return {k: v for k, v in batch.items() if k in self.input_names}


def token_batches(
    lengths: list[int], tokens: int, rows_per_item: int = 1, extra: int = 0, max_items: int | None = None
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into evaluation batches of at most ``tokens`` tokens each:
    longest first (the largest batch's memory is known at once, and each batch pads little), an
    item counting ``rows_per_item`` rows (a beam search's beams) of its length plus ``extra`` (the
    tokens it will generate); at most ``max_items`` items a batch, at least one."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            batch = batches[-1]
            longest = lengths[batch[0]] + extra  # sorted: the first is the longest
            fits = (len(batch) + 1) * rows_per_item * longest <= tokens
            if fits and (max_items is None or len(batch) < max_items):
                batch.append(i)
                continue
        batches.append([i])
    return batches


def find_head(model: nn.Module, candidates: tuple[str, ...]) -> list[str]:
    """Names of the task head's parameters: those under the first top-level module in
    ``candidates`` that the model has (PEFT's convention: ``classifier`` / ``score``, ``qa_outputs``).
    No candidates: the task trains no head (a causal LM's output layer stays frozen)."""
    from pf2lora.config import ConfigError

    if not candidates:
        return []
    for candidate in candidates:
        names = [n for n, _ in model.named_parameters() if n.split(".")[0] == candidate]
        if names:
            return names
    heads = " or ".join(repr(c) for c in candidates)
    raise ConfigError(f"the model has no task head named {heads}")
