"""DP-FedAvg: clipping, noise and Poisson sampling on the server, Flower's clipping mod on the client,
the privacy spent from the accountant, bad DP settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN
from flwr.app import ConfigRecord, Context, Message, RecordDict

from pf2lora.algorithms.base import TrainResult
from pf2lora.algorithms.dp import DPFedAvgServer, privacy_spent
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.cli import main


def _server(q: float = 1.0, sigma: float = 0.0, clip: float = 1.0, seed: int | None = 0, size: int = 4):
    inner = FedAvgServer({"w": torch.zeros(size, dtype=torch.float64)})
    return DPFedAvgServer(inner, clip=clip, noise_multiplier=sigma, sampling_rate=q, noise_seed=seed)


def test_updates_are_clipped_and_averaged_over_the_expected_number_of_clients() -> None:
    server = _server(q=1.0, sigma=0.0, clip=1.0)
    instructions = server.configure_train(1, [0, 1, 2])
    assert sorted(instructions) == [0, 1, 2] and instructions[0].config["clipping_norm"] == 1.0
    updates = {0: [3.0, 4.0, 0, 0], 1: [0.3, 0.4, 0, 0], 2: [0, 0, 0, 0.5]}  # norms 5 (clipped to 1), 0.5, 0.5
    server.aggregate_train(
        1, {c: TrainResult({"w": torch.tensor(u, dtype=torch.float64)}, 1) for c, u in updates.items()}
    )
    expected = (torch.tensor([0.6, 0.8, 0, 0]) + torch.tensor([0.3, 0.4, 0, 0]) + torch.tensor([0, 0, 0, 0.5])) / 3
    torch.testing.assert_close(server.global_params["w"], expected.double())
    # a client that did not answer still counts in the denominator (m = q M, not the replies)
    server.configure_train(2, [0, 1, 2])
    server.aggregate_train(2, {1: TrainResult({"w": server.global_params["w"] + torch.tensor([0, 0, 0.3, 0.0])}, 1)})
    torch.testing.assert_close(server.global_params["w"], expected.double() + torch.tensor([0, 0, 0.1, 0]).double())


def test_noise_has_standard_deviation_sigma_clip_over_the_expected_clients() -> None:
    server = _server(q=1.0, sigma=2.0, clip=0.5, size=200_000)
    server.configure_train(1, [0, 1, 2, 3])
    server.aggregate_train(1, {})  # nobody answered: the release is the noise alone
    std = float(server.global_params["w"].std())
    assert std == pytest.approx(2.0 * 0.5 / 4, rel=0.01)


def test_poisson_sampling_takes_each_client_with_probability_q() -> None:
    clients = list(range(4000))
    chosen = _server(q=0.25, seed=1).configure_train(1, clients)
    assert abs(len(chosen) - 1000) < 4 * math.sqrt(4000 * 0.25 * 0.75)
    assert sorted(_server(q=0.25, seed=1).configure_train(1, clients)) == sorted(chosen)  # seeded: reproducible
    assert sorted(_server(q=0.25, seed=None).configure_train(1, clients)) != sorted(chosen)  # secure: not


def test_epsilon_is_the_accountants_own() -> None:
    from dp_accounting import dp_event, rdp

    # Flower's own accountant (a separate wrapper of the same library) for the same settings
    from flwr.supercore.privacy_accounting import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    ours = privacy_spent(1.1, 0.01, 1000, 1e-5)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)), 1000)
    assert ours == accountant.get_epsilon(1e-5)
    relation, poisson = NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON
    flower = RdpAccountant(PrivacyConfig(1e-5, 10_000, relation, poisson))
    flower.compose(GaussianPrivacyEvent(noise_multiplier=1.1, sample_size=100, population_size=10_000), 1000)
    assert ours == pytest.approx(flower.get_epsilon(1e-5), rel=1e-9)
    # the known shape: more noise or fewer rounds spend less; no noise spends everything
    assert privacy_spent(2.0, 0.01, 1000, 1e-5) < ours < privacy_spent(1.1, 0.01, 2000, 1e-5)
    assert privacy_spent(0.0, 1.0, 3, 1e-5) == math.inf and privacy_spent(1.0, 1.0, 0, 1e-5) == 0.0


def test_flowers_clipping_mod_clips_the_clients_update_before_it_leaves(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from pf2lora.engines.flower.client_app import dp_clipping

    for key in ("_run_id", "_node_id", "_task_id"):  # messages are made inside a Flower task
        monkeypatch.setattr(TaskIdentity, key, 1)
    from pf2lora.engines.flower.records import decode_params, encode_params

    sent = {"b": torch.zeros(2), "a": torch.zeros(2)}
    content = RecordDict({"arrays": encode_params(sent), "config": ConfigRecord({"clipping_norm": 1.0})})
    msg = Message(content, dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def client(message: Message, _: Context) -> Message:  # an update of norm 10
        reply = {"a": torch.tensor([6.0, 0.0]), "b": torch.tensor([0.0, 8.0])}
        return Message(RecordDict({"arrays": encode_params(reply)}), reply_to=message)

    out = decode_params(next(iter(dp_clipping(msg, context, client).content.array_records.values())))
    torch.testing.assert_close(out["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, 0.8]))
    # without a clipping norm (no DP) the reply passes as it was
    plain = Message(
        RecordDict({"arrays": encode_params(sent), "config": ConfigRecord({})}), dst_node_id=1, message_type="train"
    )
    untouched = decode_params(next(iter(dp_clipping(plain, context, client).content.array_records.values())))
    torch.testing.assert_close(untouched["a"], torch.tensor([6.0, 0.0]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dp.clip=0"], "dp.clip must be > 0, got 0"),
        (["dp.noise_multiplier=-1"], "dp.noise_multiplier must be >= 0, got -1"),
        (["dp.delta=1"], "dp.delta must be in (0, 1), got 1"),
        (["train.aggregation=weighted"], "dp.enabled needs train.aggregation=uniform"),
        (["algorithms=[pf2lora,hetlora]"], "dp.enabled: hetlora does not average the clients' updates"),
    ],
)
def test_bad_dp_settings_exit_2_before_any_work(overrides, message, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "dp.enabled=true", *overrides, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pf2lora: error: ") and message in err and "\n" not in err
    assert not out.exists()


def _tiny(model: Path) -> list[str]:
    return [
        f"model.name={model}",
        "model.max_length=24",
        "data.num_clients=4",
        "data.max_examples=80",
        "data.max_test_examples=24",
        "train.rounds=2",
        "algorithms=[pf2lora,homlora]",
        "dp.enabled=true",
        "dp.noise_multiplier=0.8",
        "dp.clip=0.5",
        "dp.noise_seed=3",
        *TINY_TRAIN,
    ]


@pytest.mark.integration
def test_dp_runs_alike_on_both_engines_and_reports_the_privacy_spent(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    # Execute: the same seeded DP run in process and on Flower's simulation runtime
    for engine in ("local", "flower"):
        config = [*_tiny(tiny_model_dir), "train.client_fraction=0.5", f"engine={engine}"]
        assert main(["run", *config, "--out", str(tmp_path / engine), "--quiet"]) == 0
    # Assert: epsilon is the accountant's for the run's settings, in results.json and the summary
    epsilon = privacy_spent(0.8, 0.5, 2, 1e-5)
    assert f"epsilon {epsilon:.2f} at delta 1e-05" in capsys.readouterr().out
    local, flower = (json.loads((tmp_path / e / "results.json").read_text()) for e in ("local", "flower"))
    for method in ("pf2lora", "homlora"):
        privacy = local[method]["privacy"]
        assert privacy["epsilon"] == epsilon and flower[method]["privacy"] == privacy
        assert (privacy["noise_multiplier"], privacy["clip"], privacy["sampling_rate"]) == (0.8, 0.5, 0.5)
        # the same clients sampled and the same noise: the same model on both engines
        for cid, metrics in local[method]["clients"].items():
            assert abs(metrics["loss"] - flower[method]["clients"][cid]["loss"]) < 1e-5
    rounds = [
        [sorted(json.loads(line)["clients"]) for line in (tmp_path / e / "metrics.jsonl").read_text().splitlines()]
        for e in ("local", "flower")
    ]
    assert rounds[0] == rounds[1]
