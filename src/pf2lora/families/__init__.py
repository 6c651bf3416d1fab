"""How a run of each method family is prepared and what its methods are built from.

A family module (``lora``, ``heterogeneous``) gives ``prepare(cfg, reuse=None)``, which loads and
partitions the data and checks the models before anything is trained (``reuse``: an earlier
preparation of the same data, whose data it shares), and the prepared object it returns, which
builds each method's parts and describes its results (:class:`PreparedRun`). The runner
(:mod:`pf2lora.runner`) drives either through that protocol alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pf2lora.adapters.export import PeftExporter
from pf2lora.algorithms.base import ClientAlgorithm, ServerAlgorithm
from pf2lora.config import ConfigError, ExperimentConfig
from pf2lora.data.text import FederatedData
from pf2lora.methods import check
from pf2lora.parallelism import available_cores, forks, in_process
from pf2lora.trackers import check_installed


@dataclass
class Built:
    """One method's parts for a run: its server and client, and a maker of the PEFT exporter of
    its clients' models (None where a client's model is not a LoRA on a pretrained model)."""

    server: ServerAlgorithm
    client: ClientAlgorithm
    exporter: Callable[[], PeftExporter | None]


class PreparedRun(Protocol):
    cfg: ExperimentConfig
    data: FederatedData

    @property
    def device(self) -> torch.device: ...

    def build(self, name: str, cfg: ExperimentConfig) -> Built:
        """Method ``name``'s parts, from ``cfg`` (this run's config with its per_method settings)."""
        ...

    def result(self, name: str, built: Built, engine: Any, traffic: Any) -> dict[str, Any]:
        """What results.json says of method ``name`` beyond its metrics and traffic: task, metric
        names, trainable parameters, models; ``traffic``: the run's :class:`~pf2lora.runner.Traffic`."""
        ...

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        """Entries of results.json about the methods together (none, or pFedLoRA's accounting)."""
        ...

    def release(self) -> PreparedRun:
        """Drop the models loaded only to check them, keep the data (to ``reuse`` it). Returns self."""
        ...


def model_device(cfg: ExperimentConfig) -> torch.device:
    """``model.device``, with ``auto`` resolved to CUDA where torch sees it, else the CPU."""
    name = cfg.model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_runtime(cfg: ExperimentConfig) -> None:
    """Validate ``cfg`` (with its methods) and that this machine can run it; set torch's threads:
    one where the local engine trains clients in worker processes, or in a process that forks
    those that compute (a Flower site: :func:`pf2lora.parallelism.will_fork`), since it must not run
    multi-threaded OpenMP before it forks them; else ``train.threads``."""
    check(cfg)
    check_installed(cfg.report_to)  # a tracker named but not installed: one line naming its extra
    if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={cfg.model.device} but torch sees no CUDA device")
    t, cores, on_gpu = cfg.train, available_cores(), model_device(cfg).type == "cuda"
    if on_gpu and t.workers not in (None, 1):
        raise ConfigError(
            f"train.workers={t.workers} trains clients in forked CPU processes, which cannot share a CUDA "
            "device; leave it unset (or 1) with model.device=cuda"
        )
    if t.workers is not None and t.threads is not None and t.workers * t.threads > cores:
        raise ConfigError(
            f"train.workers x train.threads = {t.workers} x {t.threads} exceeds the {cores} cores "
            "this process may use; lower one of them"
        )
    if forks() or (cfg.engine == "local" and not on_gpu and not in_process(t.workers, cores)):
        torch.set_num_threads(1)
    elif t.threads:
        torch.set_num_threads(t.threads)
