"""The in-process engine: rounds, aggregation, per-client state, reproducibility."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_two_level, token_clients
from safetensors.torch import load, save

from pf2lora.algorithms.base import Instruction, TrainResult
from pf2lora.algorithms.fedavg import FedAvgServer, sample_clients
from pf2lora.algorithms.homlora import HomLoRAClient, HomLoRAServer
from pf2lora.algorithms.pf2lora import PF2LoRAClient, PF2LoRAServer
from pf2lora.config import TrainConfig
from pf2lora.engines.local import LocalEngine


def test_fedavg_uniform_and_weighted_by_hand() -> None:
    server = FedAvgServer({"w": torch.zeros(2)}, aggregation="uniform")
    results = {0: TrainResult({"w": torch.tensor([1.0, 2.0])}, 10), 1: TrainResult({"w": torch.tensor([3.0, 6.0])}, 30)}
    server.aggregate_train(1, results)
    torch.testing.assert_close(server.global_params["w"], torch.tensor([2.0, 4.0]))
    weighted = FedAvgServer({"w": torch.zeros(2)}, aggregation="weighted")
    weighted.aggregate_train(1, results)
    # (10 * [1, 2] + 30 * [3, 6]) / 40 = [2.5, 5.0]
    torch.testing.assert_close(weighted.global_params["w"], torch.tensor([2.5, 5.0]))


def test_client_sampling_is_seeded_and_sized() -> None:
    ids = list(range(10))
    assert sample_clients(ids, 1.0, 0, 1) == ids
    chosen = sample_clients(ids, 0.3, 0, 1)
    assert len(chosen) == 3 and chosen == sample_clients(ids, 0.3, 0, 1)
    assert set(chosen) <= set(ids)


def _run(algorithm: str, rounds: int = 2):
    model = tiny_two_level(personal_rank=2 if algorithm == "pf2lora" else 0, dropout=0.1)
    cfg = TrainConfig(local_steps=2, batch_size=4, lower_lr=0.5, eval_batch_size=7)
    server_cls, client_cls = (
        (PF2LoRAServer, PF2LoRAClient) if algorithm == "pf2lora" else (HomLoRAServer, HomLoRAClient)
    )
    data = token_clients()
    engine = LocalEngine(server_cls(model.initial_common()), client_cls(model, cfg, seed=5), data, data)
    records: list[dict] = []
    metrics, ranks = engine.run(rounds, eval_every=1, on_round=records.append)
    return engine, metrics, ranks, records


def test_pf2lora_rounds_keep_personal_state_per_client() -> None:
    engine, metrics, ranks, records = _run("pf2lora")
    assert [r["round"] for r in records] == [1, 2]
    assert all("eval" in r and set(r["eval"]) == {0, 1, 2} for r in records)
    personal = [engine.states[c]["personal"] for c in range(3)]
    name = next(n for n in personal[0] if ".lora_B." in n)
    assert not torch.equal(personal[0][name], personal[1][name])  # each client its own y_k
    assert set(metrics) == {0, 1, 2} and all(0 <= m["accuracy"] <= 1 for m in metrics.values())
    assert all(len(r) == 4 for r in ranks.values())  # 2 layers x (query, value)
    sent = records[0]["clients"][0]
    assert sent["bytes_sent"] == sent["bytes_received"] > 0


def test_homlora_evaluates_the_global_model_and_sends_all_it_trains() -> None:
    engine, metrics, _, records = _run("homlora")
    assert all(state.get("personal", {}) == {} for state in engine.states.values())
    raw = sum(t.numel() * t.element_size() for t in engine.server.global_params.values())
    sent = records[-1]["clients"][1]["bytes_sent"]  # the safetensors payload: tensors + a name header
    assert raw < sent < raw + 200 * len(engine.server.global_params)
    restored = load(save(engine.server.global_params))
    assert sent == len(save(engine.server.global_params)) and set(restored) == set(engine.server.global_params)


def test_client_states_on_disk_give_the_same_run(tmp_path) -> None:
    model = tiny_two_level(dropout=0.1)
    cfg = TrainConfig(local_steps=2, batch_size=4, lower_lr=0.5)
    data = token_clients()
    runs = []
    for state_dir in (None, tmp_path / "states"):
        engine = LocalEngine(
            PF2LoRAServer(model.initial_common()), PF2LoRAClient(model, cfg, seed=5), data, data, state_dir=state_dir
        )
        engine.run(2)
        runs.append(engine)
    # the two latest versions of each client's state, by the round it was written in
    versions = [f"client{c}.r{r}.pt" for c in range(3) for r in (1, 2)]
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == versions
    for cid in range(3):
        for name, tensor in runs[0].states[cid]["personal"].items():
            torch.testing.assert_close(runs[1].states[cid]["personal"][name], tensor, rtol=0, atol=0)


def test_same_seed_same_result() -> None:
    first, second = _run("pf2lora")[0], _run("pf2lora")[0]
    for name, tensor in first.server.global_params.items():
        torch.testing.assert_close(tensor, second.server.global_params[name], rtol=0, atol=0)


def test_only_sampled_clients_train() -> None:
    model = tiny_two_level(personal_rank=0)
    server = HomLoRAServer(model.initial_common(), client_fraction=0.34, seed=0)
    data = token_clients()
    engine = LocalEngine(server, HomLoRAClient(model, TrainConfig(local_steps=1, batch_size=4)), data, data)
    record = engine.train_round(1)
    assert len(record["clients"]) == 2  # ceil(0.34 * 3)
    assert isinstance(server.configure_evaluate(1, [0, 1, 2])[2], Instruction)


def test_compressed_payloads_halve_the_bytes_and_stay_close() -> None:
    runs = {}
    for compression in ("none", "bf16"):
        model = tiny_two_level(personal_rank=2, dtype=torch.float32)
        data = token_clients()
        engine = LocalEngine(
            PF2LoRAServer(model.initial_common()),
            PF2LoRAClient(model, TrainConfig(local_steps=2, batch_size=4)),
            data,
            data,
            compression=compression,
        )
        runs[compression] = (engine, engine.train_round(1))
    full, half = runs["none"][1]["clients"][0], runs["bf16"][1]["clients"][0]
    g_full, g_half = runs["none"][0].server.global_params, runs["bf16"][0].server.global_params
    raw = sum(t.numel() * t.element_size() for t in g_full.values())  # fp32 tensor bytes
    for way in ("bytes_sent", "bytes_received"):  # bf16 saves half the tensor bytes; the name header stays
        assert full[way] - half[way] == pytest.approx(raw / 2, rel=0.05)
    for name, tensor in g_full.items():
        assert g_half[name].dtype == torch.float32  # the receiver works in its own dtype
        torch.testing.assert_close(g_half[name], tensor, rtol=2e-2, atol=2e-3)


def test_zero_rounds_evaluate_the_untrained_model(tiny_model_dir, tmp_path) -> None:
    # Prepare / Execute: no training at all, two methods
    import json

    from conftest import TINY_TRAIN

    from pf2lora.cli import main

    out = tmp_path / "run"
    overrides = [f"model.name={tiny_model_dir}", "data.dataset=bbc_news", "data.num_clients=2", "data.max_examples=40"]
    overrides += ["data.max_test_examples=20", "model.max_length=16", "train.rounds=0", *TINY_TRAIN]
    assert main(["run", *overrides, "algorithms=[homlora,pf2lora]", "--out", str(out), "--quiet"]) == 0
    # Assert: both evaluate the same untrained model (B = D = 0, the same seeded head), recorded as round 0
    results = json.loads((out / "results.json").read_text())
    assert results["homlora"]["clients"] == results["pf2lora"]["clients"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["algorithm"], r["round"], r["clients"]) for r in records] == [("homlora", 0, {}), ("pf2lora", 0, {})]
    assert all(len(r["eval"]) == 2 for r in records)
