"""pFedLoRA: only the adapter travels, each phase changes only its own parameters, weighted FedAvg by
hand, a clear error for a model of the wrong dimension; the image data and partitions; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pf2lora.algorithms.base import Instruction, TrainResult
from pf2lora.algorithms.pfedlora import ADAPTER_A, ADAPTER_B, PFedLoRAClient, PFedLoRAServer, initial_adapter
from pf2lora.cli import main
from pf2lora.config import ConfigError, DataConfig, PFedLoRAConfig, TrainConfig, load_config
from pf2lora.data import partition
from pf2lora.data.images import ImageData, build_image_data
from pf2lora.engines.local import LocalEngine
from pf2lora.runner import prepare
from pf2lora.zoo import CNNS, ModelZoo, TruncatedEncoder


def wrong_dim_body() -> nn.Module:
    """A user's model that ends in 7 features instead of the shared 500 (used by a test below)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))


def _digits(m: int = 4) -> list[ImageData]:
    g = torch.Generator().manual_seed(0)
    return [
        ImageData(torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 10, (20,), generator=g)) for _ in range(m)
    ]


def _setup(mu: float = 0.5, objective: str = "separate"):
    zoo = ModelZoo(["cnn5", "cnn3"], 4, (1, 8, 8), 500, 10, seed=0)
    per = PFedLoRAConfig(models=["cnn5", "cnn3"], adapter_rank=4, mu=mu, objective=objective)
    client = PFedLoRAClient(zoo, TrainConfig(local_steps=3, batch_size=8, lr=1e-2), per, seed=0)
    return zoo, client, initial_adapter(500, 10, 4, 0)


def test_only_the_adapter_travels() -> None:
    zoo, client, adapter = _setup()
    data = _digits()
    engine = LocalEngine(PFedLoRAServer(adapter, "weighted"), client, data, data)
    records: list[dict] = []
    engine.run(2, on_round=records.append)
    sent = {}
    original = client.train

    def spy(cid, instruction, state, d):
        result, new_state = original(cid, instruction, state, d)
        sent[cid] = result.params
        return result, new_state

    client.train = spy
    engine.train_round(3)
    for params in sent.values():
        assert set(params) == {ADAPTER_A, ADAPTER_B}
        assert params[ADAPTER_A].shape == (4, 500) and params[ADAPTER_B].shape == (10, 4)
    adapter_bytes = records[0]["clients"][0]["bytes_sent"]
    assert adapter_bytes < 4 * (4 * 500 + 10 * 4) + 1000  # the adapter, not a CNN (>= 400k parameters)
    assert all(c["flops"] > 0 for c in records[0]["clients"].values())
    # the local model stays on the client: every client's weights differ, and none reached the server
    assert set(engine.server.global_params) == {ADAPTER_A, ADAPTER_B}


@pytest.mark.parametrize("objective", ["separate", "combined"])
def test_each_phase_changes_only_its_own_parameters(objective: str) -> None:
    zoo, client, adapter = _setup(objective=objective)
    data = _digits(1)[0]
    state = client.init_state(0)
    before_local = {k: v.clone() for k, v in state["personal"].items()}
    received = {k: v.clone() for k, v in adapter.items()}
    received[ADAPTER_B] = torch.randn(10, 4) * 0.1  # a non-zero adapter so phase 1 feels it
    after_phase1 = {}
    phase1 = client.local_phase

    def spy(cid, weights, st, d, frozen, mu):
        model, loss = phase1(cid, weights, st, d, frozen, mu)
        for k in received:  # phase 1 leaves the adapter exactly as received
            assert torch.equal(frozen[k], received[k]) and not frozen[k].requires_grad
        after_phase1.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, loss

    client.local_phase = spy
    result, new_state = client.train(0, Instruction(received, {"server_round": 1}), state, data)
    assert any(not torch.equal(after_phase1[k], before_local[k]) for k in before_local)  # phase 1 trained the model
    for k, v in new_state["personal"].items():  # phase 2 did not touch the local model
        torch.testing.assert_close(v, after_phase1[k], rtol=0, atol=0)
    assert not torch.equal(result.params[ADAPTER_B], received[ADAPTER_B])  # phase 2 trained the adapter
    assert all(torch.equal(state["personal"][k], before_local[k]) for k in before_local)  # input state untouched


def test_weighted_fedavg_by_hand() -> None:
    server = PFedLoRAServer({"adapter.A": torch.zeros(2), "adapter.B": torch.zeros(1)}, "weighted")
    server.aggregate_train(
        1,
        {
            0: TrainResult({"adapter.A": torch.tensor([1.0, 0.0]), "adapter.B": torch.tensor([4.0])}, 100),
            1: TrainResult({"adapter.A": torch.tensor([0.0, 2.0]), "adapter.B": torch.tensor([0.0])}, 300),
        },
    )
    # (100 * [1, 0] + 300 * [0, 2]) / 400 = [0.25, 1.5]; (100 * 4 + 0) / 400 = 1
    torch.testing.assert_close(server.global_params["adapter.A"], torch.tensor([0.25, 1.5]))
    torch.testing.assert_close(server.global_params["adapter.B"], torch.tensor([1.0]))


def test_build_uses_weighted_fedavg_and_the_configured_fraction() -> None:
    cfg = load_config(
        None,
        [
            "algorithms=[pfedlora]",
            "data.dataset=digits",
            "data.num_clients=4",
            "data.partition=classes",
            "train.client_fraction=0.5",
        ],
    )
    prepared = prepare(cfg)
    server = prepared.build("pfedlora", cfg).server
    assert server.aggregation == "weighted"
    assert len(server.configure_train(1, [0, 1, 2, 3])) == 2


def test_a_model_of_the_wrong_dimension_is_named(capsys) -> None:
    zoo = ModelZoo(["cnn5", "test_pfedlora:wrong_dim_body"], 2, (1, 8, 8), 500, 10)
    batch = _digits(1)[0].batch([0, 1])
    zoo.check(0, batch)
    with pytest.raises(ConfigError) as err:
        zoo.check(1, batch)
    assert "client 1's model 'test_pfedlora:wrong_dim_body'" in str(err.value) and "(2, 500)" in str(err.value)
    args = ["run", "algorithms=[pfedlora]", "data.dataset=digits", "data.num_clients=2", "train.rounds=1"]
    assert main([*args, "pfedlora.models=[cnn5,test_pfedlora:wrong_dim_body]", "--out", "/nonexistent/x"]) == 2
    out = capsys.readouterr().err.strip()
    assert out.startswith("pf2lora: error: client 1's model") and len(out.splitlines()) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pfedlora.models=[cnn9]"], "unknown model 'cnn9'"),
        (["pfedlora.models=[encoder-2]"], "is a text encoder; this dataset is an image set"),
        (["pfedlora.mu=1.5"], "pfedlora.mu must be in [0, 1]"),
        (["pfedlora.objective=joint"], "unknown pfedlora.objective 'joint'"),
        (["algorithms=[pfedlora,homlora]"], "run them separately"),
        (["data.classes_per_client=11"], "classes_per_client must be in [1, 10]"),
    ],
)
def test_bad_heterogeneous_settings(overrides: list[str], message: str, tmp_path: Path, capsys) -> None:
    args = ["run", "algorithms=[pfedlora]", "data.dataset=digits", "data.num_clients=2", "data.partition=classes"]
    assert main([*args, *overrides, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_classes_partition_gives_k_labels_per_client_in_train_and_test() -> None:
    labels = np.repeat(np.arange(10), 30)
    assignment = partition.class_assignment(10, 10, 2, seed=0)
    parts = partition.by_classes(labels, assignment, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))  # every example, once
    for held, part in zip(assignment, parts, strict=True):
        assert set(labels[part]) == set(held.tolist()) and len(held) == 2
    data = build_image_data(DataConfig(dataset="digits", num_clients=5, partition="classes"), seed=1)
    for train, test in zip(data.train, data.test, strict=True):
        assert set(train.labels.tolist()) == set(test.labels.tolist()) and len(set(train.labels.tolist())) == 2


def test_bundled_image_sets() -> None:
    mnist = build_image_data(DataConfig(dataset="mnist", num_clients=2, partition="iid"), seed=0)
    assert sum(len(d) for d in mnist.train) + sum(len(d) for d in mnist.test) == 5000
    assert mnist.train[0].batch([0, 1])["pixel_values"].shape == (2, 1, 28, 28)
    for name, (conv2, fc1) in CNNS.items():
        zoo = ModelZoo([name], 1, (1, 28, 28), 500, 10)
        assert zoo.module(0).body.fc[0].out_features == fc1 and zoo.module(0).body.features[3].out_channels == conv2


@pytest.mark.integration
def test_cli_mnist_and_text_configs(tmp_path: Path) -> None:
    out = tmp_path / "mnist"
    tiny = ["train.rounds=1", "train.local_steps=2", "data.max_examples=400", "data.max_test_examples=200"]
    assert main(["run", "configs/pfedlora_mnist.yaml", *tiny, "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"pfedlora", "local", "fedavg", "accounting"}
    assert results["local"]["bytes_per_round"] == 0
    assert results["accounting"]["communication_fedavg_over_pfedlora"] > 5
    assert results["pfedlora"]["models"]["0"] != results["pfedlora"]["models"]["1"]
    out = tmp_path / "text"
    tiny = ["train.rounds=1", "train.local_steps=1", "data.max_examples=64", "data.max_test_examples=32"]
    assert main(["run", "configs/pfedlora_text.yaml", *tiny, "model.max_length=24", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["pfedlora"]["flops_per_round"] > 0 and len(results["pfedlora"]["clients"]) == 4


def test_the_objectives_differ_as_documented() -> None:
    """Phase 1's loss: (1 - mu) CE(head) + mu CE(adapter) (separate) or CE((1 - mu) head + mu adapter)
    (combined), checked against the formulas on the client's first batch."""
    data = _digits(1)[0]
    received = initial_adapter(500, 10, 4, 0)
    received[ADAPTER_B] = 5 * torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    losses = {}
    for objective in ("separate", "combined"):
        zoo, client, _ = _setup(objective=objective)
        state = client.init_state(0)
        model = client.model(0, state["personal"])
        batch = client.next_batch(0, dict(state, cursor={"epoch": 0, "pos": 0}), data)
        torch.manual_seed(0)
        z, head = model(batch)
        ce = torch.nn.functional.cross_entropy
        adapter = z @ received[ADAPTER_A].T @ received[ADAPTER_B].T
        expected = (
            0.5 * ce(head, batch["labels"]) + 0.5 * ce(adapter, batch["labels"])
            if objective == "separate"
            else ce(0.5 * head + 0.5 * adapter, batch["labels"])
        )
        one_step = TrainConfig(local_steps=1, batch_size=8, lr=1e-2)
        client.cfg = one_step
        _, loss = client.local_phase(0, state["personal"], dict(state), data, received, 0.5)
        losses[objective] = loss
        assert loss == pytest.approx(expected.item(), rel=1e-5)
    assert losses["separate"] != pytest.approx(losses["combined"], rel=1e-3)


def test_a_truncated_encoder_loads_quietly(capfd) -> None:
    """Cutting the bundled encoder leaves its pooler unused; transformers' report of that (and its
    progress bar) would be printed for every model of every run."""
    encoder = TruncatedEncoder("bundled", 2)
    assert len(encoder.encoder.encoder.layer) == 2
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "Loading weights" not in out + err
