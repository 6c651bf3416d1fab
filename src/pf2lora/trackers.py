"""Experiment trackers (``report_to: [tensorboard, mlflow, wandb]``): each follows a run's rounds.

Per round and method a tracker receives the mean over clients and each client's evaluation
metrics (test, and ``val_*`` where the run holds out a validation split), the clients' training
losses, the round's traffic in bytes and the mean effective rank; the config as hyperparameters;
at the end the run's ``results.json`` and plots as artifacts (TensorBoard, which keeps no files,
gets the plots as images and the final means as its hparams summary). Each is an optional extra
(``pip install 'pf2lora[tensorboard]'`` ...); none is imported unless named.

Where each writes:
- ``tensorboard``: ``<run dir>/tensorboard/<method>`` (``tensorboard --logdir <run dir>/tensorboard``);
- ``mlflow``: ``$MLFLOW_TRACKING_URI`` where it is set, else a SQLite store ``<run dir>/mlflow.db``
  with artifacts in ``<run dir>/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db``;
  MLflow 3 refuses its old ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``);
  experiment ``config.name``, one MLflow run per method (tagged with the run directory);
- ``wandb``: project ``$WANDB_PROJECT`` or ``pf2lora-<config.name>``, one W&B run per method,
  files under ``<run dir>/wandb``; ``WANDB_MODE=offline`` keeps it on this machine.

These are thin adapters over each library's own logging API, written here because a run's record
(rounds of per-client dicts) is pf2lora's own shape.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pf2lora.config import TRACKERS, ConfigError, ExperimentConfig
from pf2lora.metrics import averaged

# the module each tracker needs, and the extra that installs it
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def check_installed(names: list[str]) -> None:
    """ConfigError (one line) for a tracker whose library is not installed, naming the extra."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"unknown report_to {name!r} (choose from {', '.join(TRACKERS)})")
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(
                f"report_to: {name} is not installed; pip install 'pf2lora[{name}]' (or pip install {_MODULES[name]})"
            )


def flat_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as one level of ``section.key`` values (lists and mappings as JSON text)."""
    out: dict[str, Any] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) and value and key != "per_method":
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (list, dict)):
                out[f"{prefix}{key}"] = json.dumps(value)
            else:
                out[f"{prefix}{key}"] = value

    walk(cfg.to_dict(), "")
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """What a tracker logs of one round record: ``eval/<metric>`` (mean over clients) and
    ``eval/client<k>/<metric>``, ``train/loss`` (mean) and ``train/client<k>/loss``, the round's
    ``traffic/bytes``, ``effective_rank`` (mean over clients and modules)."""
    out: dict[str, float] = {}
    clients = record.get("clients", {})
    losses = {cid: m["train_loss"] for cid, m in clients.items() if "train_loss" in m}
    if losses:
        out["train/loss"] = float(np.mean(list(losses.values())))
        out.update({f"train/client{cid}/loss": float(v) for cid, v in losses.items()})
    if clients:
        out["traffic/bytes"] = float(sum(m.get("bytes_sent", 0) + m.get("bytes_received", 0) for m in clients.values()))
    evaluation = record.get("eval") or {}
    if evaluation:
        names = averaged(next(iter(evaluation.values())))
        for name in names:
            values = [float(m[name]) for m in evaluation.values() if name in m]
            out[f"eval/{name}"] = float(np.mean(values))
        for cid, metrics in evaluation.items():
            out.update({f"eval/client{cid}/{k}": float(v) for k, v in metrics.items() if k in names})
    ranks = [r for per in (record.get("effective_rank") or {}).values() for r in per.values()]
    if ranks:
        out["effective_rank"] = float(np.mean(ranks))
    return out


def artifacts(out: Path) -> list[Path]:
    """A finished run's files a tracker keeps: results.json and the plots."""
    return [p for p in [out / "results.json", *sorted(out.glob("*.png"))] if p.is_file()]


class Tracker:
    """One library's logging of a run: a tracker run per method, opened at the method's first
    round and closed at the run's end, when each gets the run's artifacts."""

    def __init__(self, cfg: ExperimentConfig, out: Path) -> None:
        self.cfg, self.out = cfg, out
        self.runs: dict[str, Any] = {}

    def on_round(self, method: str, record: dict[str, Any]) -> None:
        if method not in self.runs:
            self.runs[method] = self._open(method)
        self._log(self.runs[method], scalars(record), int(record["round"]))

    def on_method(self, method: str, result: dict[str, Any]) -> None:
        if method in self.runs:  # a resumed run's method finished before: nothing of it logged again
            final = {f"final/{k}": float(v) for k, v in result["mean"].items() if isinstance(v, (int, float))}
            self._summary(self.runs[method], final)

    def on_end(self, out: Path, results: dict[str, Any]) -> None:
        files = artifacts(out)
        for handle in self.runs.values():
            self._artifacts(handle, files)
        self.close()

    def close(self) -> None:
        while self.runs:
            self._close(self.runs.popitem()[1])

    # each library's own calls
    def _open(self, method: str) -> Any:
        raise NotImplementedError

    def _log(self, handle: Any, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def _summary(self, handle: Any, final: dict[str, float]) -> None:
        raise NotImplementedError

    def _artifacts(self, handle: Any, files: list[Path]) -> None:
        raise NotImplementedError

    def _close(self, handle: Any) -> None:
        raise NotImplementedError


class TensorBoard(Tracker):
    """Event files under ``<run dir>/tensorboard/<method>``."""

    def _open(self, method: str) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(self.out / "tensorboard" / method))
        text = "\n".join(f"    {k}: {v}" for k, v in flat_config(self.cfg).items())  # a Markdown code block
        writer.add_text("config", text, 0)
        return writer

    def _log(self, handle: Any, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            handle.add_scalar(key, value, step)
        handle.flush()

    def _summary(self, handle: Any, final: dict[str, float]) -> None:
        params = {k: v for k, v in flat_config(self.cfg).items() if isinstance(v, (int, float, str, bool))}
        handle.add_hparams(params, final, run_name=".")

    def _artifacts(self, handle: Any, files: list[Path]) -> None:
        import matplotlib.image

        for path in files:
            if path.suffix == ".png":
                image = matplotlib.image.imread(path)[..., :3]
                handle.add_image(f"plots/{path.stem}", image, 0, dataformats="HWC")

    def _close(self, handle: Any) -> None:
        handle.close()


class MLflow(Tracker):
    """An MLflow run per method, through ``MlflowClient`` (several open at once)."""

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.out.absolute() / 'mlflow.db'}"
        return MlflowClient(tracking_uri=uri)

    def _open(self, method: str) -> Any:
        from mlflow.entities import Param

        client = self._client()
        found = client.get_experiment_by_name(self.cfg.name)
        if found is not None:
            experiment = found.experiment_id
        else:  # artifacts beside a SQLite store (its default is ./mlartifacts of the working directory)
            uri = client.tracking_uri
            where = (
                (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
                if uri.startswith("sqlite:///")
                else None
            )
            experiment = client.create_experiment(self.cfg.name, artifact_location=where)
        tags = {"mlflow.runName": f"{self.out.parent.name}/{self.out.name}/{method}", "pf2lora.method": method}
        run = client.create_run(experiment, tags={**tags, "pf2lora.run_dir": str(self.out.absolute())})
        params = [Param(k, str(v)[:6000]) for k, v in flat_config(self.cfg).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            client.log_batch(run.info.run_id, params=params[start : start + 100])
        return client, run.info.run_id

    def _log(self, handle: Any, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        client, run_id = handle
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for start in range(0, len(metrics), 1000):  # and at most 1,000 metrics
            client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def _summary(self, handle: Any, final: dict[str, float]) -> None:
        self._log(handle, final, 0)

    def _artifacts(self, handle: Any, files: list[Path]) -> None:
        client, run_id = handle
        for path in files:
            client.log_artifact(run_id, str(path))

    def _close(self, handle: Any) -> None:
        client, run_id = handle
        client.set_terminated(run_id)


class WandB(Tracker):
    """A W&B run per method (``WANDB_MODE=offline``: written under ``<run dir>/wandb`` only)."""

    def _open(self, method: str) -> Any:
        import wandb

        return wandb.init(
            project=os.environ.get("WANDB_PROJECT") or f"pf2lora-{self.cfg.name}",
            name=f"{self.out.parent.name}/{self.out.name}/{method}",
            group=self.cfg.name,
            dir=str(self.out),
            config=flat_config(self.cfg),
            tags=[method],
            reinit="create_new",
        )

    def _log(self, handle: Any, values: dict[str, float], step: int) -> None:
        handle.log(values, step=step)

    def _summary(self, handle: Any, final: dict[str, float]) -> None:
        handle.summary.update(final)

    def _artifacts(self, handle: Any, files: list[Path]) -> None:
        import wandb

        images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in files if p.suffix == ".png"}
        if images:
            handle.log(images)
        for path in files:
            handle.save(str(path), base_path=str(path.parent), policy="now")

    def _close(self, handle: Any) -> None:
        handle.finish()


_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


@contextlib.contextmanager
def shared_store(cfg: ExperimentConfig, out: Path) -> Iterator[None]:
    """Work over many runs (``compare``, ``tune``) logs them all to one MLflow store, in ``out``
    (``$MLFLOW_TRACKING_URI`` where it is set): the variable is set for the runs and the worker
    processes they start. TensorBoard finds every run under ``--logdir out``."""
    if "mlflow" not in cfg.report_to or os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out.absolute() / 'mlflow.db'}"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def publish(cfg: ExperimentConfig, out: Path, label: str, files: list[Path]) -> None:
    """The outputs of work over many runs (``compare``'s table, ``tune``'s best values and plots)
    as artifacts of a tracker run of their own, named ``label``, in every tracker ``report_to``
    names (each of the runs was logged as it ran)."""
    check_installed(cfg.report_to)
    for name in cfg.report_to:
        tracker = _CLASSES[name](cfg, out)
        handle = tracker._open(label)
        try:
            tracker._artifacts(handle, [p for p in files if p.is_file()])
        finally:
            tracker._close(handle)


def start_trackers(cfg: ExperimentConfig, out: Path) -> list[Tracker]:
    """The trackers ``cfg.report_to`` names, each following the run in ``out``."""
    check_installed(cfg.report_to)
    return [_CLASSES[name](cfg, out) for name in cfg.report_to]
