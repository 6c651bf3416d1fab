"""report_to: what each tracker holds, read back with its own library's reader, equals what the run
wrote; a tracker that is not installed is one line naming its extra, before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pf2lora.cli import main
from pf2lora.trackers import scalars

TINY = [
    "algorithms=[homlora]",
    "data.num_clients=2",
    "data.max_examples=64",
    "data.max_test_examples=16",
    "data.validation_fraction=0.25",
    "train.rounds=2",
    "train.local_steps=2",
    "train.batch_size=4",
    "train.eval_every=1",
    "model.max_length=24",
]


def test_a_round_record_becomes_scalars() -> None:
    record = {
        "round": 3,
        "clients": {
            "0": {"train_loss": 1.0, "bytes_sent": 10, "bytes_received": 20},
            "1": {"train_loss": 3.0, "bytes_sent": 10, "bytes_received": 20},
        },
        "eval": {
            "0": {"accuracy": 0.5, "val_accuracy": 0.25, "num_examples": 4, "val_num_examples": 4},
            "1": {"accuracy": 1.0, "val_accuracy": 0.75, "num_examples": 4, "val_num_examples": 4},
        },
        "effective_rank": {"0": {"a": 2, "b": 4}, "1": {"a": 3, "b": 3}},
    }
    values = scalars(record)
    assert values["train/loss"] == 2.0 and values["train/client1/loss"] == 3.0
    assert values["traffic/bytes"] == 60.0
    assert values["eval/accuracy"] == 0.75 and values["eval/val_accuracy"] == 0.5
    assert values["eval/client0/val_accuracy"] == 0.25
    assert values["effective_rank"] == 3.0
    assert not any(k.endswith("num_examples") for k in values)


def _wandb_history(folder: Path) -> list[dict[str, float]]:
    """The history rows of an offline W&B run, read from its transaction log with wandb's reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = folder.glob("offline-run-*/run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(path))
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


@pytest.mark.integration
def test_tensorboard_mlflow_and_wandb_hold_the_runs_metrics(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    assert main(["run", *TINY, "report_to=[tensorboard,mlflow,wandb]", "--out", str(out), "--quiet"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = {  # per round: the mean over clients the run wrote, test and validation
        name: {r["round"]: float(np.mean([m[name] for m in r["eval"].values()])) for r in lines}
        for name in ("accuracy", "val_accuracy", "val_mcc")
    }
    assert sorted(expected["accuracy"]) == [1, 2]
    results = json.loads((out / "results.json").read_text())["homlora"]

    events = EventAccumulator(str(out / "tensorboard" / "homlora"))
    events.Reload()
    for name, per_round in expected.items():
        logged = {e.step: e.value for e in events.Scalars(f"eval/{name}")}
        assert logged == pytest.approx(per_round, abs=1e-6)
    assert "plots/curves" in events.Tags()["images"]

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("experiment").experiment_id])
    for name, per_round in expected.items():
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"eval/{name}")}
        assert logged == pytest.approx(per_round, abs=1e-6)
    assert run.data.params["train.rounds"] == "2" and run.data.params["data.validation_fraction"] == "0.25"
    assert run.data.metrics["final/val_accuracy"] == pytest.approx(results["mean"]["val_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "curves.png"} <= artifacts

    rows = [r for r in _wandb_history(out / "wandb") if "eval/accuracy" in r]
    for name, per_round in expected.items():
        assert {int(r["_step"]): r[f"eval/{name}"] for r in rows} == pytest.approx(per_round, abs=1e-6)


def test_a_tracker_not_installed_is_one_line_naming_its_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    import importlib.util

    from pf2lora import trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    out = tmp_path / "run"
    assert main(["run", *TINY, "report_to=[tensorboard,wandb]", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'pf2lora[wandb]'" in err, err
    assert not out.exists()


@pytest.mark.integration
def test_compare_logs_every_run_and_its_table_to_one_store(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from pf2lora import compare

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "grid"
    items = [*TINY, "train.rounds=1", "seeds=0,1", "report_to=[mlflow]"]
    compare.run(None, items, out)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("experiment").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == [
        "rotten_tomatoes-h0.9-seed0/homlora/homlora",
        "rotten_tomatoes-h0.9-seed1/homlora/homlora",
        f"{tmp_path.name}/grid/compare",
    ]
    (table,) = [r for r in runs if r.info.run_name.endswith("/compare")]
    assert {"table.md", "compare.png"} <= {a.path for a in client.list_artifacts(table.info.run_id)}
    assert not (Path.cwd() / "mlartifacts").exists()
