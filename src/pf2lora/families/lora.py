"""The LoRA family: a pretrained model (with the task's head) and a two-level LoRA adapter.

:func:`prepare` checks everything a user can get wrong (config, data, columns, model, target
modules) before anything is trained or written; the prepared run hands every method the same
frozen base model, seeded alike, and builds each method's parts through the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from pf2lora.adapters.export import Card, PeftExporter
from pf2lora.adapters.two_level import AdapterLayout, find_target_modules
from pf2lora.config import ExperimentConfig
from pf2lora.data.text import FederatedData
from pf2lora.families import Built, check_runtime, model_device
from pf2lora.methods import get
from pf2lora.models import load_kwargs, load_tokenizer, resolve
from pf2lora.tasks import Task, task_class
from pf2lora.utils import numel, stable_seed


@dataclass
class Prepared:
    cfg: ExperimentConfig
    data: FederatedData
    task: Task  # bound to the data (e.g. its number of labels)
    # the base prepare() validated, with the RNG state right after loading it: handed out once
    # instead of loading the model again (the adapters' init draws from that RNG state next)
    checked: tuple[torch.nn.Module, torch.Tensor] | None = None

    def base_model(self) -> torch.nn.Module:
        """The pretrained model with the task's head, seeded identically for every method, on its device."""
        if self.checked is not None:
            (model, rng), self.checked = self.checked, None
            torch.set_rng_state(rng)
            return model
        torch.manual_seed(stable_seed(self.cfg.seed, "head"))
        return self.task.load_model(self.cfg.model.name, self.cfg.model.dropout).to(self.device)

    @property
    def device(self) -> torch.device:
        return model_device(self.cfg)

    def build(self, name: str, cfg: ExperimentConfig) -> Built:
        server, client, model = get(name).build(cfg, self.base_model(), self.task)
        # built only where clients' adapters are exported here (the local engine; on Flower each client does)
        exporter = partial(_peft_exporter, self, name, cfg, model.layout)
        return Built(server, client, exporter)

    def result(self, name: str, built: Built, engine: Any, traffic: Any) -> dict[str, Any]:
        pooled = get(name).pooled
        personal = engine.personal_parameters().get(0, 0)
        return {
            "task": self.task.name,
            "metric_names": list(self.task.metrics),  # the first is the primary one
            # what one client trains: what it sends back (its own rank for HETLoRA) plus its personal part
            "trainable_parameters": numel(built.server.global_params) if pooled else traffic.sent() + personal,
        }

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        return {}

    def release(self) -> Prepared:
        self.checked = None
        return self


def prepare(cfg: ExperimentConfig, reuse: Prepared | None = None) -> Prepared:
    """Load and partition the data and check the model, raising ConfigError on any bad input.
    ``reuse``: a preparation of the same data and task (its data and task are shared; the model is
    loaded again when a method asks for it)."""
    check_runtime(cfg)
    if reuse is not None:
        return Prepared(cfg, reuse.data, reuse.task)
    tokenizer = load_tokenizer(cfg.model.name)
    task, data = task_class(cfg.task.name).build(cfg, tokenizer)
    prepared = Prepared(cfg, data, task)
    base = prepared.base_model()
    find_target_modules(base, cfg.lora.target_modules)
    task.check_model(base, tokenizer)
    prepared.checked = (base, torch.get_rng_state())
    return prepared


def _peft_exporter(prepared: Prepared, name: str, cfg: ExperimentConfig, layout: AdapterLayout) -> PeftExporter:
    method, d, t = get(name), cfg.data, cfg.train
    split = {
        "heterogeneity": f"heterogeneity h = {d.heterogeneity}",
        "dirichlet": f"Dirichlet alpha = {d.dirichlet_alpha}",
        "classes": f"{d.classes_per_client} classes per client",
        "key": f"by {d.key_column or 'the dataset key column'}",
        "iid": "iid",
    }.get(d.partition, d.partition)
    card = Card(
        method=name,
        description=method.description,
        task=prepared.task.name,
        base_model=str(resolve(cfg.model.name)),
        model_name=cfg.model.name,
        base_kwargs=load_kwargs(cfg.model.name),
        data=d.dataset + (f" ({d.path})" if d.path else ""),
        partition=f"{d.num_clients} clients, {split}, seed {cfg.seed}",
        training=(
            f"{t.rounds} round{'s' * (t.rounds != 1)} x {t.local_steps} local steps, batch {t.batch_size}, "
            f"learning rate {t.lr:g}"
        ),
        config=cfg.to_dict(),
        metric_names=list(prepared.task.metrics),
        label_names=list(prepared.data.label_names) if prepared.task.name == "classification" else [],
        note=method.export_note,
    )
    return PeftExporter(prepared.base_model(), layout, cfg.lora.target_modules, prepared.task.peft_task_type, card)
