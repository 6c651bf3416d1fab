"""The default experiment (`make run`) end to end (~4 min): both methods learn the task itself.

Every method's mean client MCC must reach 0.5: a method that only learns each client's label
distribution (predicting its majority topic) scores MCC 0 on every client, whatever its accuracy.
The time limit (6 minutes on 2 cores) is measured by hand, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pf2lora.cli import main
from pf2lora.config import load_config


@pytest.mark.integration
def test_default_experiment_learns_the_task(tmp_path: Path, capsys) -> None:
    out = tmp_path / "default"
    assert main(["run", "configs/default.yaml", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    cfg = load_config("configs/default.yaml")
    assert sorted(results) == sorted(cfg.algorithms)
    printed = capsys.readouterr().out
    for name, result in results.items():
        assert len(result["clients"]) == cfg.data.num_clients
        assert result["mean"]["mcc"] >= 0.5, (name, result["mean"])
        assert f"{result['mean']['accuracy']:.4f}" in printed
