"""The default experiment (`make run`) end to end (~3 min): both methods learn the task itself.
It runs `make run`'s command in a process of its own, with the machine's cores (its clients train
in worker processes where there are two or more).

Every method's mean client MCC must reach 0.5: a method that only learns each client's label
distribution (predicting its majority topic) scores MCC 0 on every client, whatever its accuracy.
The time limit (6 minutes on 2 cores) is measured by hand, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pf2lora.config import load_config
from pf2lora.parallelism import CORES_ENV

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_default_experiment_learns_the_task(tmp_path: Path) -> None:
    out = tmp_path / "default"
    env = {k: v for k, v in os.environ.items() if k != CORES_ENV}
    pf2lora = str(Path(sys.executable).parent / "pf2lora")
    command = [pf2lora, "run", "configs/default.yaml", "--out", str(out), "--quiet"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    cfg = load_config("configs/default.yaml")
    assert sorted(results) == sorted(cfg.algorithms)
    printed = proc.stdout
    for name, result in results.items():
        assert len(result["clients"]) == cfg.data.num_clients
        assert result["mean"]["mcc"] >= 0.5, (name, result["mean"])
        assert f"{result['mean']['accuracy']:.4f}" in printed
