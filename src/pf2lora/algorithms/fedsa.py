"""FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning"): the A matrices learn what clients share, the B matrices what is their own.

Client k holds one LoRA ``{A_k, B_k}`` of rank r (and the task head). Each round:

    (A_k, B_k) <- I local AdamW steps on F_k from (A, B_k)        (both factors trained)
    A          <- sum_k w_k A_k                                     (only A is sent and averaged)

B_k never leaves the client (it starts at zero, standard LoRA init, so every client starts at the
pretrained model). The head is averaged with A (``lora.head: shared``) or stays with B
(``personal``). ``w_k`` is uniform or by example count (``train.aggregation``). Evaluation: client
k's own model ``W0 + s B_k A``.
"""

from __future__ import annotations

from torch import nn

from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.base import ClientState
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.lora_client import SplitLoRAClient, lora_model
from pf2lora.config import ExperimentConfig
from pf2lora.tasks.base import Task


def is_shared(name: str, head: str) -> bool:
    """Whether ``name`` travels: every ``lora_A``, and the head where it is shared."""
    return ".lora_A." in name or (".lora_B." not in name and head == "shared")


class FedSALoRAServer(FedAvgServer):
    """Averages what it receives: the A matrices (and the shared head); it never sees a B."""


class FedSALoRAClient(SplitLoRAClient):
    """Trains A (received) and its own B together; only A goes back."""

    def __init__(self, model: TwoLevelModel, train, seed: int, head: str) -> None:
        super().__init__(model, train, seed)
        self.head = head
        initial = model.initial_common()
        self._personal_init = {k: v for k, v in initial.items() if not is_shared(k, head)}

    def init_state(self, client_id: int) -> ClientState:
        state = super().init_state(client_id)
        state["personal"] = {k: v.clone() for k, v in self._personal_init.items()}
        return state


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[FedSALoRAServer, FedSALoRAClient, TwoLevelModel]:
    model = lora_model(cfg, base, task)
    t, head = cfg.train, cfg.lora.head
    shared = {k: v for k, v in model.initial_common().items() if is_shared(k, head)}
    return (
        FedSALoRAServer(shared, t.aggregation, t.client_fraction, cfg.seed),
        FedSALoRAClient(model, t, cfg.seed, head),
        model,
    )
