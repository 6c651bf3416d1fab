"""scripts/decompose.py: a finished PF2LoRA run's common adapter alone against common + personal."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pf2lora.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.num_clients=2", "data.max_examples=48", "data.max_test_examples=16", "train.batch_size=4"]
TINY += ["train.rounds=1", "train.local_steps=3", "model.max_length=24", "train.lower_lr=5.0", "algorithms=[pf2lora]"]


def _script():
    spec = importlib.util.spec_from_file_location("decompose", REPO / "scripts" / "decompose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.integration
def test_decompose_reproduces_the_run_and_separates_the_levels(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["run", *TINY, "--out", str(run), "--quiet"]) == 0
    reported = json.loads((run / "results.json").read_text())["pf2lora"]["clients"]
    decompose = _script()
    assert decompose.main([str(run), "--json", str(tmp_path / "d.json")]) == 0
    (result,) = json.loads((tmp_path / "d.json").read_text())
    for cid, metrics in reported.items():
        client = result["clients"][cid]
        # with its personal adapter, each client is exactly the model the run evaluated
        assert client["with_personal"]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-12)
        assert client["with_personal"]["mcc"] == pytest.approx(metrics["mcc"], abs=1e-12)
        assert client["personal_to_common_norm"] > 0  # the personal adapter moved at lower_lr 5
    capsys.readouterr()
    assert decompose.main([str(tmp_path)]) == 2  # no PF2LoRA run there
    assert "holds no finished PF2LoRA run" in capsys.readouterr().err
