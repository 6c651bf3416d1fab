"""The synthetic rank-recovery experiment (paper Section 5, Figure 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pf2lora.cli import main
from pf2lora.experiments.synthetic import (
    SyntheticConfig,
    build_pf2lora,
    ground_truth,
    run_synthetic,
    shared_fit_lower_bound,
)


def test_ground_truths_have_the_paper_ranks() -> None:
    for truth in ("independent", "shared"):
        ws = ground_truth(SyntheticConfig(truth=truth, seed=4))
        assert [int(torch.linalg.matrix_rank(w)) for w in ws] == [3, 4]


def test_pf2lora_init_has_orthogonal_row_spaces() -> None:
    server, client, model = build_pf2lora(SyntheticConfig(seed=1))
    a = server.global_params["linear.lora_A.common.weight"]
    c = client.init_state(0)["personal"]["linear.lora_A.personal.weight"]
    torch.testing.assert_close(a @ c.T, torch.zeros(4, 2, dtype=torch.float64), atol=1e-10, rtol=0)
    w = model.delta({**server.global_params, **client.init_state(0)["personal"]})
    assert int(torch.linalg.matrix_rank(w)) == 6  # r + r~: the two levels add up


def test_independent_truths_cannot_be_fitted_below_the_bound() -> None:
    """With unrelated W*_k the shared-part model is bounded away from the truth, however trained."""
    cfg = SyntheticConfig(truth="independent", steps=500, seed=0)
    results = run_synthetic(cfg)
    fitted = sum(c["final"]["frobenius"] ** 2 for c in results["methods"]["pf2lora"].values())
    assert results["shared_fit_lower_bound"] > 1.0
    assert fitted >= results["shared_fit_lower_bound"]
    assert shared_fit_lower_bound(ground_truth(SyntheticConfig(truth="shared")), 2) == pytest.approx(0, abs=1e-9)


@pytest.mark.integration
@pytest.mark.parametrize("seed", [0, 1])  # seed 2 recovers the ranks too; two keep `make test` in budget
def test_synthetic_cli_recovers_ranks(seed: int, tmp_path: Path) -> None:
    out = tmp_path / "syn"
    assert main(["synthetic", "--seed", str(seed), "--out", str(out)]) == 0
    results = json.loads((out / "synthetic.json").read_text())
    assert (out / "figure2.png").stat().st_size > 10_000
    pf2, het = results["methods"]["pf2lora"], results["methods"]["hetlora"]
    floors = results["noise_floor"]
    assert [pf2[c]["final"]["rank"] for c in ("client1", "client2")] == [3, 4]
    for client in ("client1", "client2"):
        assert pf2[client]["final"]["test_loss"] <= 2 * floors[client]
        assert pf2[client]["final"]["frobenius"] < 0.5
        assert len(pf2[client]["history"]["test_loss"]) == 200  # every 50 of 10000 steps
    assert het["client1"]["final"]["rank"] <= 2
    assert het["client1"]["final"]["test_loss"] >= 5 * pf2["client1"]["final"]["test_loss"]


def test_synthetic_bad_input(tmp_path: Path, capsys) -> None:
    assert main(["synthetic", "--truth", "weird", "--out", str(tmp_path / "x")]) == 2
    assert "unknown truth 'weird'" in capsys.readouterr().err
    for steps in ("0", "15"):
        assert main(["synthetic", "--steps", steps, "--out", str(tmp_path / "x")]) == 2
        assert "steps must be a positive multiple of the interval (10)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "synthetic.json").write_text("{}")
    assert main(["synthetic", "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "synthetic.json").read_text() == "{}"
