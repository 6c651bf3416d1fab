"""One experiment: every chosen method on the same client partitions, written to a run directory.

Everything a user can get wrong (config, data, columns, model, target modules) is checked in
:func:`prepare`, before anything is trained or written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from pf2lora.adapters.export import PeftExporter
from pf2lora.adapters.two_level import AdapterLayout, find_target_modules
from pf2lora.algorithms import POOLED, build_algorithm
from pf2lora.algorithms.base import ClientAlgorithm, ClientData, ServerAlgorithm
from pf2lora.algorithms.fedavg import clients_per_round
from pf2lora.config import HETEROGENEOUS_ALGORITHMS, ConfigError, ExperimentConfig
from pf2lora.data.text import FederatedData
from pf2lora.engines.local import LocalEngine
from pf2lora.metrics import summarize
from pf2lora.models import load_tokenizer
from pf2lora.tasks import Task, records_dir, task_class
from pf2lora.utils import numel, stable_seed

log = logging.getLogger(__name__)


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


def model_device(cfg: ExperimentConfig) -> torch.device:
    """``model.device``, with ``auto`` resolved to CUDA where torch sees it, else the CPU."""
    name = cfg.model.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_runtime(cfg: ExperimentConfig) -> None:
    """Validate ``cfg`` and that this machine can run it; set torch's thread count."""
    cfg.validate()
    if cfg.model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={cfg.model.device} but torch sees no CUDA device")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)


def prepare_any(cfg: ExperimentConfig) -> Any:
    """:func:`prepare` for the LoRA methods, ``prepare_heterogeneous`` for the methods where every
    client trains its own model (the two kinds never mix in one config)."""
    if cfg.algorithms[0] in HETEROGENEOUS_ALGORITHMS:
        from pf2lora.experiments.heterogeneous import prepare_heterogeneous

        return prepare_heterogeneous(cfg)
    return prepare(cfg)


def run_any(
    prepared: Any, out: Path, progress: Callable[[str, int], Callable[[], None]] | None = None
) -> dict[str, Any]:
    """Run a prepared experiment (from :func:`prepare_any`) on its engine: Flower's simulation
    runtime for ``engine=flower``, else in process (:func:`run_experiment` or
    ``run_heterogeneous``). Returns ``results.json``."""
    if prepared.cfg.engine == "flower":
        from pf2lora.engines.flower.simulation import run_simulation

        return run_simulation(prepared, out, progress)
    if prepared.cfg.algorithms[0] in HETEROGENEOUS_ALGORITHMS:
        from pf2lora.experiments.heterogeneous import run_heterogeneous

        return run_heterogeneous(prepared, out, progress)
    return run_experiment(prepared, out, progress)


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Load and partition the data and check the model, raising ConfigError on any bad input."""
    check_runtime(cfg)
    tokenizer = load_tokenizer(cfg.model.name)
    task, data = task_class(cfg.task.name).build(cfg, tokenizer)
    prepared = Prepared(cfg, data, task)
    base = prepared.base_model()
    find_target_modules(base, cfg.lora.target_modules)
    task.check_model(base, tokenizer)
    prepared.checked = (base, torch.get_rng_state())
    return prepared


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse to write over an earlier run unless asked to."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} already holds files; choose a new directory or pass --force")


class RunLog:
    """A run directory's ``config.yaml`` (written at once) and ``metrics.jsonl`` (one line per method
    and round, flushed as it comes)."""

    def __init__(self, out: Path, cfg: ExperimentConfig) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.path = out / "metrics.jsonl"
        self._file = open(self.path, "w")  # noqa: SIM115 - closed by __exit__

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def recorder(self, name: str, also: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """The engine's per-round callback for method ``name``: ``also(record)``, then one line."""

        def write(record: dict[str, Any]) -> None:
            also(record)
            self._file.write(json.dumps({"algorithm": name, **_jsonable(record)}) + "\n")
            self._file.flush()

        return write


class Engine(Protocol):
    """What a run needs of an engine (the in-process one, or Flower's)."""

    client_ids: list[int]

    def run(self, rounds: int, eval_every: int, on_round: Callable[[dict[str, Any]], None]) -> Any: ...

    def personal_parameters(self) -> dict[int, int]: ...

    def save_clients(
        self, out: Path, name: str, make_exporter: Callable[[], PeftExporter | None], server_round: int
    ) -> None: ...


# (out, method name, its config, server, client, train splits, test splits, progress) -> its engine
EngineFactory = Callable[
    [Path, str, ExperimentConfig, ServerAlgorithm, ClientAlgorithm, Sequence[ClientData], Sequence[ClientData], Any],
    Engine,
]


def run_experiment(
    prepared: Prepared,
    out: Path,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    engine_factory: EngineFactory | None = None,
) -> dict[str, Any]:
    """Run every method of ``prepared.cfg`` and write the run directory. Returns ``results.json``.
    ``engine_factory``: the engine each method runs on (default: the in-process one)."""
    cfg, data = prepared.cfg, prepared.data
    make_engine = engine_factory or local_engine
    results: dict[str, Any] = {}
    with RunLog(out, cfg) as log:
        for name in cfg.algorithms:
            started = time.perf_counter()
            mcfg = cfg.for_method(name)  # per_method settings merged in
            server, client, model = build_algorithm(name, mcfg, prepared.base_model(), prepared.task)
            pooled = name in POOLED
            train = [data.pooled_train()] if pooled else data.train
            engine = make_engine(out, name, mcfg, server, client, train, data.test, progress)
            traffic = Traffic()
            per_client, ranks = engine.run(mcfg.train.rounds, mcfg.train.eval_every, log.recorder(name, traffic.add))
            mean, std = summarize(per_client)
            personal = engine.personal_parameters().get(0, 0)
            results[name] = {
                "task": prepared.task.name,
                "metric_names": list(prepared.task.metrics),  # the first is the primary one
                "clients": {str(c): m for c, m in per_client.items()},
                "mean": mean,
                "std": std,
                "effective_rank": {str(c): r for c, r in ranks.items()},
                # what one client trains: what it receives (its own rank for HETLoRA) plus its personal part
                "trainable_parameters": numel(server.global_params) if pooled else traffic.received() + personal,
                # nothing travels in centralized training
                "communicated_parameters_per_client_round": None if pooled else traffic.per_client_round(),
                "seconds": round(time.perf_counter() - started, 2),
            }
            save_common(out / "checkpoints" / name, server.global_params)
            # built only where clients' adapters are exported here (the local engine; on Flower each client does)
            make_exporter = partial(_peft_exporter, prepared, model.layout, mcfg.lora.target_modules)
            engine.save_clients(out, name, make_exporter, mcfg.train.rounds)
            del engine, server, client, model
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from pf2lora.plots import plot_run  # matplotlib only when writing plots

    plot_run(out, results, out / "metrics.jsonl")
    return results


def _peft_exporter(prepared: Prepared, layout: AdapterLayout, targets: list[str]) -> PeftExporter:
    return PeftExporter(prepared.base_model(), layout, targets, prepared.task.peft_task_type)


def local_engine(
    out: Path,
    name: str,
    cfg: ExperimentConfig,
    server: ServerAlgorithm,
    client: ClientAlgorithm,
    train: Sequence[ClientData],
    test: Sequence[ClientData],
    progress: Callable[[str, int], Callable[[], None]] | None,
) -> LocalEngine:
    """The in-process engine for method ``name`` of a run: client state in memory or under
    ``out/client_state/<name>``, the configured compression, a progress bar of client-rounds."""
    steps = cfg.train.rounds * clients_per_round(len(train), cfg.train.client_fraction)
    state_dir = out / "client_state" / name if cfg.train.client_state == "disk" else None
    on_step = progress(name, steps) if progress else None
    records = records_dir(out, cfg.task.name, name)
    return LocalEngine(server, client, train, test, on_step, state_dir, cfg.train.compression, records)


class Traffic:
    """What moved and what was computed, from the engine's round records: parameters per client
    and round, and (summed over a round's clients) bytes and FLOPs per round."""

    def __init__(self) -> None:
        self.received_per_client: dict[str, int] = {}
        self.total = 0
        self.replies = 0
        self.bytes: list[int] = []
        self.flops: list[float] = []

    def add(self, record: dict[str, Any]) -> None:
        clients = record.get("clients", {})
        for cid, m in clients.items():
            self.received_per_client[str(cid)] = m["parameters_received"]
            self.total += m["parameters_received"] + m["parameters_sent"]
            self.replies += 1
        self.bytes.append(sum(m["bytes_sent"] + m["bytes_received"] for m in clients.values()))
        self.flops.append(float(sum(m.get("flops", 0.0) for m in clients.values())))

    def per_round(self) -> dict[str, float]:
        """Mean over rounds of the bytes (both ways) and FLOPs of all clients of a round."""
        return {
            "flops_per_round": float(np.mean(self.flops)) if self.flops else 0.0,
            "bytes_per_round": float(np.mean(self.bytes)) if self.bytes else 0.0,
        }

    def received(self) -> int:
        """Mean over clients of what each received last (the size of the model it trains)."""
        values = list(self.received_per_client.values())
        return round(sum(values) / len(values)) if values else 0

    def per_client_round(self) -> int:
        """Parameters sent plus received, per client and round."""
        return round(self.total / self.replies) if self.replies else 0


def save_common(folder: Path, common: dict[str, torch.Tensor]) -> None:
    """The server's final global parameters (``checkpoints/<method>/common.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in common.items()}, str(folder / "common.safetensors"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value
