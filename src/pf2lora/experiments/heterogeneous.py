"""A run of the model-heterogeneous methods: pFedLoRA, local-only training, FedAvg of whole models.

Same run directory as the LoRA methods (config.yaml, metrics.jsonl, results.json, plots,
checkpoints), plus the accounting the pFedLoRA paper reports: floating-point operations per round
(counted while training) and bytes per round (the serialized payloads), and pFedLoRA's ratios
against whole-model FedAvg.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.pfedlora import (
    FedAvgModelClient,
    HeterogeneousClient,
    LocalOnlyClient,
    PFedLoRAClient,
    PFedLoRAServer,
    initial_adapter,
)
from pf2lora.config import ExperimentConfig
from pf2lora.data.images import IMAGE_DATASETS, build_image_data
from pf2lora.data.text import FederatedData, build_federated_data
from pf2lora.experiment import (
    EngineFactory,
    RunLog,
    Traffic,
    check_runtime,
    local_engine,
    model_device,
    save_common,
)
from pf2lora.metrics import summarize
from pf2lora.tasks.classification import Classification
from pf2lora.zoo import ModelZoo

CLIENTS = {"pfedlora": PFedLoRAClient, "local": LocalOnlyClient, "fedavg": FedAvgModelClient}


@dataclass
class PreparedHeterogeneous:
    cfg: ExperimentConfig
    data: FederatedData
    zoos: dict[str, ModelZoo] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return model_device(self.cfg)


def prepare_heterogeneous(cfg: ExperimentConfig, data: FederatedData | None = None) -> PreparedHeterogeneous:
    """Load and partition the data (or take ``data``, already built from the same settings), build
    every client's model and check it gives the shared dimension on the client's own data. Raises
    ConfigError on any bad input, before training."""
    check_runtime(cfg)
    if data is None and cfg.data.dataset in IMAGE_DATASETS:
        data = build_image_data(cfg.data, cfg.seed)
    elif data is None:
        from pf2lora.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.name)
        data = build_federated_data(cfg.data, tokenizer, cfg.model.max_length, cfg.seed)
    images = getattr(data.train[0], "images", None)
    in_shape: tuple[int, ...] | None = None if images is None else tuple(images.shape[1:])
    prepared = PreparedHeterogeneous(cfg, data)
    m, pf = cfg.data.num_clients, cfg.pfedlora
    for name in cfg.algorithms:
        names = [pf.fedavg_model] if name == "fedavg" else pf.models
        zoo = ModelZoo(names, m, in_shape, pf.rep_dim, data.num_labels, cfg.seed, cfg.model.name)
        for cid in range(m):
            sample = data.train[cid]
            zoo.check(cid, sample.batch(list(range(min(2, len(sample))))))
        prepared.zoos[name] = zoo
    return prepared


def build(name: str, prepared: PreparedHeterogeneous) -> tuple[FedAvgServer, HeterogeneousClient]:
    cfg, zoo = prepared.cfg, prepared.zoos[name]
    pf, t = cfg.pfedlora, cfg.train
    if name == "pfedlora":
        initial = initial_adapter(pf.rep_dim, prepared.data.num_labels, pf.adapter_rank, cfg.seed)
    elif name == "fedavg":
        initial = zoo.initial_state(0)  # one global model for everyone
    else:
        initial = {}  # local-only: nothing travels
    server_cls = PFedLoRAServer if name == "pfedlora" else FedAvgServer
    server = server_cls(initial, "weighted", t.client_fraction, cfg.seed)  # FedAvg by training-set size
    client = CLIENTS[name](zoo, t, pf, cfg.seed).to(prepared.device)
    return server, client


def run_heterogeneous(
    prepared: PreparedHeterogeneous,
    out: Path,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    engine_factory: EngineFactory | None = None,
) -> dict[str, Any]:
    """Run every method of ``prepared.cfg``; write the run directory; return ``results.json``.
    ``engine_factory``: the engine each method runs on (default: the in-process one)."""
    make_engine = engine_factory or local_engine
    cfg, data = prepared.cfg, prepared.data
    results: dict[str, Any] = {}
    with RunLog(out, cfg) as log:
        for name in cfg.algorithms:
            started = time.perf_counter()
            mcfg = cfg.for_method(name)
            prepared_m = PreparedHeterogeneous(mcfg, data, prepared.zoos)
            server, client = build(name, prepared_m)
            engine = make_engine(out, name, mcfg, server, client, data.train, data.test, progress)
            traffic = Traffic()
            per_client, _ = engine.run(mcfg.train.rounds, mcfg.train.eval_every, log.recorder(name, traffic.add))
            mean, std = summarize(per_client)
            zoo = prepared.zoos[name]
            own = list(engine.personal_parameters().values())
            results[name] = {
                "task": Classification.name,  # these methods classify (config validation says so)
                "metric_names": list(Classification.metrics),
                "clients": {str(c): m for c, m in per_client.items()},
                "mean": mean,
                "std": std,
                "effective_rank": {},
                "models": {str(c): zoo.names[c] for c in engine.client_ids},
                # a client's own model plus the adapter (or whole model) it receives
                "trainable_parameters": round(float(np.mean(own))) + traffic.received(),
                "communicated_parameters_per_client_round": traffic.per_client_round(),
                **traffic.per_round(),
                "seconds": round(time.perf_counter() - started, 2),
            }
            save_common(out / "checkpoints" / name, server.global_params)
            engine.save_clients(out, name, lambda: None, mcfg.train.rounds)
            del engine, server, client
    if "pfedlora" in results and "fedavg" in results:
        p, f = results["pfedlora"], results["fedavg"]
        results["accounting"] = {
            "fedavg_model": cfg.pfedlora.fedavg_model,
            "communication_fedavg_over_pfedlora": f["bytes_per_round"] / max(p["bytes_per_round"], 1.0),
            "computation_fedavg_over_pfedlora": f["flops_per_round"] / max(p["flops_per_round"], 1.0),
        }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from pf2lora.plots import plot_run

    plot_run(out, {k: v for k, v in results.items() if k != "accounting"}, out / "metrics.jsonl")
    return results
