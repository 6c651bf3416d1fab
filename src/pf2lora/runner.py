"""One run: every chosen method on the same client partitions, written to a run directory.

The runner sits below the engines: it is handed an engine factory (the in-process engine's, or
Flower's) and never imports one. What differs between method families (how a run is prepared,
what a method is built from, what its results say) comes from :mod:`pf2lora.families` through the
method registry; nothing here dispatches on a method's name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from pf2lora.adapters.export import PeftExporter
from pf2lora.algorithms.base import ClientAlgorithm, ClientData, ServerAlgorithm
from pf2lora.config import ConfigError, ExperimentConfig
from pf2lora.families import PreparedRun, heterogeneous, lora
from pf2lora.methods import family_of, get
from pf2lora.metrics import summarize

_PREPARE = {"lora": lora.prepare, "heterogeneous": heterogeneous.prepare}

Progress = Callable[[str, int], Callable[[], None]]


def prepare(cfg: ExperimentConfig, reuse: PreparedRun | None = None) -> PreparedRun:
    """Check ``cfg`` and everything it names (data, columns, models) and prepare the run, raising
    ConfigError on any bad input before anything is trained or written. ``reuse``: an earlier
    preparation of the same data, whose data is shared. The family's prepare checks ``cfg`` with its
    methods first (``methods.check``); an unknown first method already fails in ``family_of``."""
    return _PREPARE[family_of(cfg)](cfg, reuse)  # type: ignore[operator]


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse to write over an earlier run unless asked to, and a directory that cannot be made or
    written (its nearest existing folder is a file, or not writable), before any work."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} already holds files; choose a new directory or pass --force")
    nearest = out.absolute()
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise ConfigError(f"--out {out} cannot be made: {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be written: {nearest} is not writable")


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
        self,
        out: Path,
        name: str,
        make_exporter: Callable[[], PeftExporter | None],
        server_round: int,
        metrics: dict[int, dict[str, float]] | None = None,
    ) -> None: ...


# (out, method name, its config, server, client, train splits, test splits, progress) -> its engine
EngineFactory = Callable[
    [Path, str, ExperimentConfig, ServerAlgorithm, ClientAlgorithm, Sequence[ClientData], Sequence[ClientData], Any],
    Engine,
]


def run(
    prepared: PreparedRun, out: Path, engine_factory: EngineFactory, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every method of ``prepared.cfg``, each on the engine ``engine_factory`` makes, and write
    the run directory. Returns ``results.json``."""
    cfg, data = prepared.cfg, prepared.data
    results: dict[str, Any] = {}
    with RunLog(out, cfg) as log:
        for name in cfg.algorithms:
            started = time.perf_counter()
            method = get(name)
            mcfg = cfg.for_method(name)  # per_method settings merged in
            built = prepared.build(name, mcfg)
            train = [data.pooled_train()] if method.pooled else data.train
            engine = engine_factory(out, name, mcfg, built.server, built.client, train, data.test, progress)
            traffic = Traffic()
            per_client, ranks = engine.run(mcfg.train.rounds, mcfg.train.eval_every, log.recorder(name, traffic.add))
            mean, std = summarize(per_client)
            fields = prepared.result(name, built, engine, traffic)
            results[name] = {
                "task": fields.pop("task"),
                "metric_names": fields.pop("metric_names"),
                "clients": {str(c): m for c, m in per_client.items()},
                "mean": mean,
                "std": std,
                "effective_rank": {str(c): r for c, r in ranks.items()},
                # nothing travels in pooled training
                "communicated_parameters_per_client_round": None if method.pooled else traffic.per_client_round(),
                **fields,
                "seconds": round(time.perf_counter() - started, 2),
            }
            save_common(out / "checkpoints" / name, built.server.global_params)
            engine.save_clients(out, name, built.exporter, mcfg.train.rounds, per_client)
            del engine, built
    results.update(prepared.summary(results))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from pf2lora.plots import plot_run  # matplotlib only when writing plots

    plot_run(out, {k: v for k, v in results.items() if k != "accounting"}, out / "metrics.jsonl")
    return results


class Traffic:
    """What moved and what was computed, from the engine's round records: parameters per client
    and round, and (summed over a round's clients) bytes and FLOPs per round."""

    def __init__(self) -> None:
        self.received_per_client: dict[str, int] = {}
        self.sent_per_client: dict[str, int] = {}
        self.total = 0
        self.replies = 0
        self.bytes: list[int] = []
        self.flops: list[float] = []

    def add(self, record: dict[str, Any]) -> None:
        clients = record.get("clients", {})
        for cid, m in clients.items():
            self.received_per_client[str(cid)] = m["parameters_received"]
            self.sent_per_client[str(cid)] = m["parameters_sent"]
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
        """Mean over clients of what each received last."""
        values = list(self.received_per_client.values())
        return round(sum(values) / len(values)) if values else 0

    def sent(self) -> int:
        """Mean over clients of what each sent last: what it trained of what travels (FedEx-LoRA's
        clients receive the base weight's residual too, and FFA-LoRA's train B only)."""
        values = list(self.sent_per_client.values())
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
