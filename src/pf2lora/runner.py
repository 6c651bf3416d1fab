"""One run: every chosen method on the same client partitions, written to a run directory.

The runner sits below the engines: it is handed an engine factory (the in-process engine's, or
Flower's) and never imports one. What differs between method families (how a run is prepared,
what a method is built from, what its results say) comes from :mod:`pf2lora.families` through the
method registry; nothing here dispatches on a method's name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
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
from pf2lora.algorithms.dp import DPFedAvgServer, privacy_spent
from pf2lora.config import ConfigError, ExperimentConfig, from_dict
from pf2lora.families import Built, PreparedRun, heterogeneous, lora
from pf2lora.methods import family_of, get
from pf2lora.metrics import VALIDATION_PREFIX, summarize
from pf2lora.rounds import Checkpoint
from pf2lora.utils import atomic_write

_PREPARE = {"lora": lora.prepare, "heterogeneous": heterogeneous.prepare}

Progress = Callable[[str, int], Callable[[], None]]


def prepare(cfg: ExperimentConfig, reuse: PreparedRun | None = None) -> PreparedRun:
    """Check ``cfg`` and everything it names (data, columns, models) and prepare the run, raising
    ConfigError on any bad input before anything is trained or written. ``reuse``: an earlier
    preparation of the same data, whose data is shared. The family's prepare checks ``cfg`` with its
    methods first (``methods.check``); an unknown first method already fails in ``family_of``."""
    return _PREPARE[family_of(cfg)](cfg, reuse)  # type: ignore[operator]


class RunLog:
    """A run directory's ``config.yaml`` (written at once) and ``metrics.jsonl`` (one line per method
    and round, flushed as it comes). ``resume_at``: continue a run's ``metrics.jsonl`` from this byte
    offset (what its last checkpoint had seen; a line written after it is dropped)."""

    def __init__(self, out: Path, cfg: ExperimentConfig, resume_at: int | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        if resume_at is None:
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._file = open(self.path, "w")  # noqa: SIM115 - closed by __exit__
        else:
            self._file = open(self.path, "r+")  # noqa: SIM115 - closed by __exit__
            self._file.truncate(resume_at)
            self._file.seek(resume_at)

    def position(self) -> int:
        """How far ``metrics.jsonl`` has been written (bytes)."""
        return self._file.tell()

    def records(self, name: str) -> list[dict[str, Any]]:
        """Method ``name``'s round records written so far."""
        self._file.flush()
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return [{k: v for k, v in line.items() if k != "algorithm"} for line in lines if line["algorithm"] == name]

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

    def run(
        self, rounds: int, eval_every: int, on_round: Callable[[dict[str, Any]], None], checkpoint: Checkpoint
    ) -> Any: ...

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


class RunCallback(Protocol):
    """Something that follows a run as it goes (an experiment tracker, ``pf2lora tune``'s pruner):
    each method's round records as they are written, each method's result, the run's end."""

    def on_round(self, method: str, record: dict[str, Any]) -> None: ...

    def on_method(self, method: str, result: dict[str, Any]) -> None: ...

    def on_end(self, out: Path, results: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def run(
    prepared: PreparedRun,
    out: Path,
    engine_factory: EngineFactory,
    progress: Progress | None = None,
    resume: bool = False,
    callbacks: Sequence[RunCallback] = (),
) -> dict[str, Any]:
    """Run every method of ``prepared.cfg``, each on the engine ``engine_factory`` makes, and write
    the run directory, leaving a checkpoint after every round (:mod:`pf2lora.rounds`). ``resume``:
    ``out`` holds this run, killed part way (:func:`check_resume`); the methods it finished are
    kept and the one it was running goes on from its last complete round. ``callbacks`` follow the
    run, after the trackers ``report_to`` names (:mod:`pf2lora.trackers`); one that raises stops
    it (a pruned trial). Returns ``results.json``."""
    from pf2lora.trackers import start_trackers

    followers = [*start_trackers(prepared.cfg, out), *callbacks]
    try:
        results = _run(prepared, out, engine_factory, progress, resume, followers)
    finally:
        for follower in followers:
            follower.close()
    return results


def _run(
    prepared: PreparedRun,
    out: Path,
    engine_factory: EngineFactory,
    progress: Progress | None,
    resume: bool,
    followers: list[RunCallback],
) -> dict[str, Any]:
    cfg, data = prepared.cfg, prepared.data
    results: dict[str, Any] = {}
    finished = _finished_methods(out, cfg.algorithms) if resume else {}
    with RunLog(out, cfg, _resume_offset(out, cfg.algorithms, finished) if resume else None) as log:
        for name in cfg.algorithms:
            if name in finished:
                results[name] = finished[name]["result"]
                continue
            started = time.perf_counter()
            method = get(name)
            mcfg = cfg.for_method(name)  # per_method settings merged in
            built = build(prepared, name, mcfg)
            train = [data.pooled_train()] if method.pooled else data.train
            earlier = log.records(name)  # rounds of a resumed method run before the crash
            bar = _advanced(progress, sum(len(r.get("clients", {})) for r in earlier))
            # each client's test split and/or validation split (data.evaluate_test, data.validation_fraction)
            evaluation = data.evaluation(cfg.data.evaluate_test)
            engine = engine_factory(out, name, mcfg, built.server, built.client, train, evaluation, bar)
            traffic = Traffic()
            for record in earlier:
                traffic.add(record)
            checkpoint = Checkpoint(out, name, log.position)
            record = log.recorder(name, _following(name, traffic.add, followers))
            per_client, ranks = engine.run(mcfg.train.rounds, mcfg.train.eval_every, record, checkpoint)
            mean, std = summarize(per_client)
            fields = prepared.result(name, built, engine, traffic)
            if not cfg.data.evaluate_test:  # every metric is a validation one (pf2lora tune's trials)
                fields["metric_names"] = [VALIDATION_PREFIX + m for m in fields["metric_names"]]
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
                **({"privacy": privacy(mcfg)} if mcfg.dp.enabled else {}),
                "seconds": round(time.perf_counter() - started, 2),
            }
            save_common(out / "checkpoints" / name, built.server.global_params)
            engine.save_clients(out, name, built.exporter, mcfg.train.rounds, per_client)
            del engine, built
            _write_json(checkpoint.folder / "done.json", {"result": results[name], "metrics_bytes": log.position()})
            for follower in followers:
                follower.on_method(name, results[name])
            checkpoint.clear()
            shutil.rmtree(checkpoint.folder / "clients", ignore_errors=True)
    results.update(prepared.summary(results))
    _write_json(out / "results.json", results)
    from pf2lora.plots import plot_run  # matplotlib only when writing plots

    plot_run(out, {k: v for k, v in results.items() if k != "accounting"}, out / "metrics.jsonl")
    shutil.rmtree(out / "resume", ignore_errors=True)  # the run is complete: nothing to resume
    for follower in followers:
        follower.on_end(out, results)
    return results


def _following(
    name: str, also: Callable[[dict[str, Any]], None], followers: list[RunCallback]
) -> Callable[[dict[str, Any]], None]:
    """The round callback: ``also(record)``, then each follower's ``on_round``."""

    def each(record: dict[str, Any]) -> None:
        also(record)
        for follower in followers:
            follower.on_round(name, record)

    return each


def build(prepared: PreparedRun, name: str, cfg: ExperimentConfig) -> Built:
    """Method ``name``'s parts; with ``dp.enabled`` its server wrapped in DP-FedAvg
    (:mod:`pf2lora.algorithms.dp`), which samples the clients itself."""
    if not cfg.dp.enabled:
        return prepared.build(name, cfg)
    every = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, client_fraction=1.0))
    built = prepared.build(name, every)
    dp = cfg.dp
    server = DPFedAvgServer(built.server, dp.clip, dp.noise_multiplier, cfg.train.client_fraction, dp.noise_seed)
    return Built(server, built.client, built.exporter)


def privacy(cfg: ExperimentConfig) -> dict[str, Any]:
    """What results.json says of a DP run's privacy: epsilon at delta after its rounds, and how."""
    dp, t = cfg.dp, cfg.train
    epsilon = privacy_spent(dp.noise_multiplier, t.client_fraction, t.rounds, dp.delta)
    return {
        "epsilon": epsilon if math.isfinite(epsilon) else "inf",
        "delta": dp.delta,
        "noise_multiplier": dp.noise_multiplier,
        "clip": dp.clip,
        "sampling_rate": t.client_fraction,
        "rounds": t.rounds,
        "accountant": "RDP, Poisson-sampled Gaussian (dp-accounting)",
        "seeded_noise": dp.noise_seed is not None,
    }


def check_resume(out: Path, cfg: ExperimentConfig | None) -> ExperimentConfig:
    """The config of the run in ``out`` that ``--resume`` continues; ConfigError if ``out`` is not a
    run directory or ``cfg`` (when given) differs from the run's own in anything but
    ``train.workers`` (how many processes run it, not what it computes)."""
    if not out.is_dir():
        raise ConfigError(f"--resume {out}: no such directory")
    if not (out / "config.yaml").is_file() or not (out / "metrics.jsonl").is_file():
        raise ConfigError(f"--resume {out} is not a pf2lora run directory (no config.yaml and metrics.jsonl)")
    try:
        written = from_dict(ExperimentConfig, yaml.safe_load((out / "config.yaml").read_text())).validate()
    except (yaml.YAMLError, ConfigError, TypeError, ValueError) as err:
        raise ConfigError(f"--resume {out}: its config.yaml cannot be read ({err})") from err
    if cfg is None:
        return written
    ours, theirs = _flat(cfg.to_dict()), _flat(written.to_dict())
    differ = sorted(k for k in set(ours) | set(theirs) if k != "train.workers" and ours.get(k) != theirs.get(k))
    if differ:
        key = differ[0]
        raise ConfigError(
            f"--resume {out}: the run was started with {key}={theirs.get(key)!r}, not {ours.get(key)!r} "
            f"({len(differ)} setting{'s differ' if len(differ) > 1 else ' differs'}); resume it with its own config"
        )
    return cfg


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _finished_methods(out: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The methods a resumed run had finished (each with its result and where metrics.jsonl then stood)."""
    done = {}
    for name in names:
        path = out / "resume" / name / "done.json"
        if path.is_file():
            done[name] = json.loads(path.read_text())
    return done


def _resume_offset(out: Path, names: list[str], finished: dict[str, dict[str, Any]]) -> int:
    """Where the resumed run's metrics.jsonl ends: after the last round its checkpoints saw."""
    offset = 0
    for name in names:
        if name in finished:
            offset = finished[name]["metrics_bytes"]
            continue
        saved = Checkpoint(out, name).metrics_bytes()
        return offset if saved is None else saved
    return offset


def _advanced(progress: Progress | None, steps: int) -> Progress | None:
    """``progress`` whose bars start ``steps`` client-rounds in: what a resumed method trained
    before the crash, so that its bar ends full."""
    if progress is None or not steps:
        return progress

    def task(name: str, total: int) -> Callable[[], None]:
        advance = progress(name, total)
        for _ in range(min(steps, total)):
            advance()
        return advance

    return task


def _write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, written whole and then renamed in."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))


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
