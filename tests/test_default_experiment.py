"""The default experiment (`make run`) end to end: PF2LoRA leads HOMLoRA by >= 5 points (~4 min)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pf2lora.cli import main


@pytest.mark.integration
def test_default_experiment_pf2lora_leads_homlora(tmp_path: Path, capsys) -> None:
    out = tmp_path / "default"
    assert main(["run", "configs/default.yaml", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    pf2, hom = results["pf2lora"], results["homlora"]
    assert len(pf2["clients"]) == len(hom["clients"]) == 8
    assert pf2["mean"]["accuracy"] >= hom["mean"]["accuracy"] + 0.05
    printed = capsys.readouterr().out
    assert f"{pf2['mean']['accuracy']:.4f}" in printed and f"{hom['mean']['accuracy']:.4f}" in printed
