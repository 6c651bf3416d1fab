"""The model-heterogeneous family: each client its own model (pFedLoRA, local-only training,
FedAvg of whole models).

Same run directory as the LoRA methods, plus the accounting the pFedLoRA paper reports:
floating-point operations per round (counted while training) and bytes per round (the serialized
payloads), and pFedLoRA's ratios against whole-model FedAvg.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pf2lora.config import ConfigError, ExperimentConfig
from pf2lora.data.images import IMAGE_DATASETS, build_image_data
from pf2lora.data.text import FederatedData, build_federated_data
from pf2lora.families import Built, check_runtime, model_device
from pf2lora.methods import get
from pf2lora.models import load_tokenizer
from pf2lora.tasks.classification import Classification
from pf2lora.zoo import ModelZoo


@dataclass
class PreparedHeterogeneous:
    cfg: ExperimentConfig
    data: FederatedData
    zoos: dict[str, ModelZoo] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return model_device(self.cfg)

    def build(self, name: str, cfg: ExperimentConfig) -> Built:
        server, client = get(name).build(cfg, self.zoos[name], self.data.num_labels)
        return Built(server, client.to(self.device), lambda: None)

    def result(self, name: str, built: Built, engine: Any, traffic: Any) -> dict[str, Any]:
        zoo = self.zoos[name]
        own = list(engine.personal_parameters().values())
        return {
            "task": Classification.name,  # these methods classify (the registry's check says so)
            "metric_names": list(Classification.metrics),
            "effective_rank": {},
            "models": {str(c): zoo.names[c] for c in engine.client_ids},
            # a client's own model plus the adapter (or whole model) it receives
            "trainable_parameters": round(float(np.mean(own))) + traffic.received(),
            **traffic.per_round(),  # the pFedLoRA paper's accounting: bytes and FLOPs per round
        }

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        if "pfedlora" not in results or "fedavg" not in results:
            return {}
        p, f = results["pfedlora"], results["fedavg"]
        return {
            "accounting": {
                "fedavg_model": self.cfg.pfedlora.fedavg_model,
                "communication_fedavg_over_pfedlora": f["bytes_per_round"] / max(p["bytes_per_round"], 1.0),
                "computation_fedavg_over_pfedlora": f["flops_per_round"] / max(p["flops_per_round"], 1.0),
            }
        }

    def release(self) -> PreparedHeterogeneous:
        self.zoos.clear()
        return self


def prepare(cfg: ExperimentConfig, reuse: PreparedHeterogeneous | None = None) -> PreparedHeterogeneous:
    """Load and partition the data (or share ``reuse``'s, built from the same settings), build
    every client's model and check it gives the shared dimension on the client's own data. Raises
    ConfigError on any bad input, before training."""
    check_runtime(cfg)
    if cfg.model.dtype in ("bfloat16", "float16"):
        raise ConfigError(
            f"model.dtype={cfg.model.dtype} lowers a pretrained base under LoRA adapters; pfedlora's client "
            "models train whole in float32 (use model.dtype=float32 or auto)"
        )
    data = reuse.data if reuse is not None else None
    if data is None and cfg.data.dataset in IMAGE_DATASETS:
        data = build_image_data(cfg.data, cfg.seed)
    elif data is None:
        data = build_federated_data(cfg.data, load_tokenizer(cfg.model.name), cfg.model.max_length, cfg.seed)
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
