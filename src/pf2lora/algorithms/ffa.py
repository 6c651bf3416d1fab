"""FFA-LoRA (Sun et al., ICLR 2024, "Improving LoRA in Privacy-preserving Federated Learning"):
federated freeze-A LoRA.

A is drawn once from a seed every client shares (Kaiming-uniform, as LoRA's init) and never
trained; only B (zero at the start) and the task head are trained and averaged:

    B_k <- I local AdamW steps on F_k(W0 + s B A) from B          (A fixed)
    B   <- sum_k w_k B_k

Since every client has the same A, the average of the clients' updates ``sum_k w_k s B_k A`` is
the update of the averaged adapter ``s B A``: aggregation is exact, and the noise DP adds to B
is not multiplied by a second noisy factor. A never travels (each client rebuilds it from the
seed), so a message holds B and the head: half of HOMLoRA's. ``w_k``: ``train.aggregation``.
"""

from __future__ import annotations

from torch import nn

from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.lora_client import SplitLoRAClient, lora_model
from pf2lora.config import ExperimentConfig
from pf2lora.tasks.base import Task


class FFALoRAServer(FedAvgServer):
    """Averages B (and the head)."""


class FFALoRAClient(SplitLoRAClient):
    """Trains B and the head on the fixed A it holds (``constants``)."""


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[FFALoRAServer, FFALoRAClient, TwoLevelModel]:
    model = lora_model(cfg, base, task)  # A's init is seeded alike on every client (the run's seed)
    t = cfg.train
    initial = model.initial_common()
    frozen = {k: v for k, v in initial.items() if ".lora_A." in k}
    trained = {k: v for k, v in initial.items() if k not in frozen}
    return (
        FFALoRAServer(trained, t.aggregation, t.client_fraction, cfg.seed),
        FFALoRAClient(model, t, cfg.seed, constants=frozen),
        model,
    )
