"""Registry of methods: each is a server part and a client part over a two-level model."""

from __future__ import annotations

from torch import nn

from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.base import ClientAlgorithm, ServerAlgorithm
from pf2lora.algorithms.centralized import CentralizedClient, CentralizedServer, centralized_train_config
from pf2lora.algorithms.hetlora import HetLoRAClient, HetLoRAServer, initial_ranks
from pf2lora.algorithms.homlora import HomLoRAClient, HomLoRAServer
from pf2lora.algorithms.perfedavg import PerFedAvgClient, PerFedAvgServer
from pf2lora.algorithms.pf2lora import PF2LoRAClient, PF2LoRAServer
from pf2lora.config import ExperimentConfig
from pf2lora.tasks.base import Task

_METHODS = {
    "pf2lora": (PF2LoRAServer, PF2LoRAClient, True),
    "homlora": (HomLoRAServer, HomLoRAClient, False),
    "perfedavg": (PerFedAvgServer, PerFedAvgClient, False),
    "centralized": (CentralizedServer, CentralizedClient, False),
}
POOLED = frozenset({"centralized"})  # methods that train on all clients' data pooled


def build_algorithm(
    name: str, cfg: ExperimentConfig, base: nn.Module, task: Task
) -> tuple[ServerAlgorithm, ClientAlgorithm, TwoLevelModel]:
    """Wrap ``base`` with the adapters method ``name`` needs; return its server and client parts.
    ``task`` is handed to the model as it is (it names the head, the loss and the metrics); the
    methods never look at it."""
    lo, t = cfg.lora, cfg.train
    if name == "hetlora":
        het = cfg.hetlora
        scaling = lo.lora_alpha / lo.rank  # every client's scaling, whatever its rank
        model = TwoLevelModel(base, task, lo.target_modules, rank=het.r_max, lora_alpha=scaling * het.r_max)
        ranks = initial_ranks(cfg.data.num_clients, het.r_min, het.r_max, het.ranks)
        server = HetLoRAServer(model.initial_common(), model.layout, ranks, t.client_fraction, cfg.seed)
        return server, HetLoRAClient(model, t, het, cfg.seed), model
    server_cls, client_cls, personal = _METHODS[name]
    model = TwoLevelModel(
        base,
        task,
        lo.target_modules,
        rank=lo.rank,
        lora_alpha=lo.lora_alpha,
        personal_rank=lo.personal_rank if personal else 0,
        personal_lora_alpha=lo.personal_lora_alpha,
        head=lo.head,
    )
    if name == "centralized":
        train = centralized_train_config(t, cfg.data.num_clients)
        return CentralizedServer(model.initial_common(), cfg.seed), CentralizedClient(model, train, cfg.seed), model
    server = server_cls(model.initial_common(), t.aggregation, t.client_fraction, cfg.seed)
    if name == "perfedavg":
        return server, PerFedAvgClient(model, t, cfg.perfedavg, cfg.seed), model
    client = client_cls(model, t, cfg.seed)
    return server, client, model
