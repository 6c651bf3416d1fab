"""The newer federated LoRA methods (FedSA-LoRA, FFA-LoRA, FlexLoRA, FedDPA, FedEx-LoRA), each
against expectations computed by hand: what travels, what never changes, what the server hands out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_two_level, token_clients

from pf2lora.adapters.two_level import COMMON, TwoLevelModel, base_delta_name
from pf2lora.algorithms.base import Instruction, TrainResult
from pf2lora.algorithms.feddpa import FedDPAClient, FedDPAServer, instance_weights, mixed
from pf2lora.algorithms.fedex import FedExLoRAClient, FedExLoRAServer
from pf2lora.algorithms.fedsa import FedSALoRAClient, FedSALoRAServer, is_shared
from pf2lora.algorithms.ffa import FFALoRAClient, FFALoRAServer
from pf2lora.algorithms.flexlora import FlexLoRAClient, FlexLoRAServer
from pf2lora.config import FedDPAConfig, TrainConfig
from pf2lora.engines.local import LocalEngine
from pf2lora.tasks.classification import Classification

TRAIN = TrainConfig(local_steps=2, batch_size=4, lr=1e-2, eval_batch_size=7)


class Recorder:
    """Wraps a server: keeps every message both ways (train, replies, evaluation)."""

    def __init__(self, server) -> None:
        self.server, self.sent, self.replies = server, [], []

    def __getattr__(self, name):
        return getattr(self.server, name)

    def configure_train(self, server_round, client_ids):
        out = self.server.configure_train(server_round, client_ids)
        self.sent += [i.params for i in out.values()]
        return out

    def configure_evaluate(self, server_round, client_ids):
        out = self.server.configure_evaluate(server_round, client_ids)
        self.sent += [i.params for i in out.values()]
        return out

    def aggregate_train(self, server_round, results):
        self.replies.append({cid: r.params for cid, r in results.items()})
        return self.server.aggregate_train(server_round, results)

    @property
    def global_params(self):
        return self.server.global_params


def _names(messages) -> set[str]:
    return {name for m in messages for name in m}


def _engine(server, client, rounds: int = 2) -> tuple[LocalEngine, Recorder, dict]:
    data = token_clients()
    recorder = Recorder(server)
    engine = LocalEngine(recorder, client, data, data)
    metrics, _ = engine.run(rounds)
    return engine, recorder, metrics


def test_fedsa_lora_never_sends_b_and_averages_a() -> None:
    model = tiny_two_level(personal_rank=0)
    shared = {k: v for k, v in model.initial_common().items() if is_shared(k, "shared")}
    engine, rec, metrics = _engine(FedSALoRAServer(shared), FedSALoRAClient(model, TRAIN, 3, "shared"))
    # Assert: no B in any message either way; A (and the head) in every one
    assert not any(".lora_B." in n for n in _names(rec.sent) | _names(r for rs in rec.replies for r in rs.values()))
    assert any(".lora_A." in n for n in _names(rec.sent))
    # each client's B is its own, trained away from zero, and differs between clients
    b = next(n for n in model.layout.x_names if ".lora_B." in n)
    own = [engine.states[c]["personal"][b] for c in range(3)]
    assert all(t.abs().sum() > 0 for t in own) and not torch.equal(own[0], own[1])
    # the server's A is the plain mean of the last replies' A
    a = next(n for n in shared if ".lora_A." in n)
    last = rec.replies[-1]
    torch.testing.assert_close(engine.server.global_params[a], sum(last[c][a] for c in last) / 3)
    assert set(metrics) == {0, 1, 2}


def test_fedsa_lora_keeps_a_personal_head_on_the_client() -> None:
    model = tiny_two_level(personal_rank=0)
    shared = {k: v for k, v in model.initial_common().items() if is_shared(k, "personal")}
    _, rec, _ = _engine(FedSALoRAServer(shared), FedSALoRAClient(model, TRAIN, 3, "personal"), rounds=1)
    assert all(".lora_A." in n for n in _names(rec.sent))  # A only: no B, no head


def test_ffa_lora_never_changes_a_and_never_sends_it() -> None:
    model = tiny_two_level(personal_rank=0)
    initial = model.initial_common()
    frozen = {k: v for k, v in initial.items() if ".lora_A." in k}
    trained = {k: v for k, v in initial.items() if k not in frozen}
    client = FFALoRAClient(model, TRAIN, 3, constants=frozen)
    engine, rec, _ = _engine(FFALoRAServer(trained), client)
    assert not any(".lora_A." in n for n in _names(rec.sent) | _names(r for rs in rec.replies for r in rs.values()))
    for cid in range(3):  # the model each client evaluates has the initial A, bit for bit, and a trained B
        view = engine.client_view(cid, engine.server.configure_evaluate(2, [cid])[cid])
        for name, value in frozen.items():
            assert torch.equal(view.params[name], value)
        b = next(n for n in trained if ".lora_B." in n)
        assert view.params[b].abs().sum() > 0
    # what it exports holds that same A
    assert all(torch.equal(client.exported(view, {})[n], v) for n, v in frozen.items())


def _flex_factors(layout, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in layout.modules:
        n, mm = 16, 16
        out[f"{m}.lora_A.{COMMON}.weight"] = torch.randn(rank, n, generator=g, dtype=torch.float64)
        out[f"{m}.lora_B.{COMMON}.weight"] = torch.randn(mm, rank, generator=g, dtype=torch.float64)
    for h in layout.head_names:
        out[h] = torch.full((1,), float(seed), dtype=torch.float64)
    return out


def test_flexlora_hands_each_client_the_truncated_svd_of_the_weighted_average_of_products() -> None:
    model = tiny_two_level(personal_rank=0)  # r_max = 4
    lo = model.layout
    server = FlexLoRAServer(model.initial_common(), lo, ranks=[1, 3, 4])
    # Prepare: three clients of ranks 1, 3 and 4 with 10, 30 and 60 examples
    replies = {
        c: TrainResult(_flex_factors(lo, r, seed=c + 1), n) for c, (r, n) in enumerate([(1, 10), (3, 30), (4, 60)])
    }
    # Execute
    server.aggregate_train(1, replies)
    sent = server.configure_train(2, [0, 1, 2])
    # Assert: per module, B_k A_k is the best rank-r_k approximation of (10 B0A0 + 30 B1A1 + 60 B2A2) / 100
    for m in lo.modules:
        a, b = f"{m}.lora_A.{COMMON}.weight", f"{m}.lora_B.{COMMON}.weight"
        avg = (
            sum(
                n * (replies[c].params[b].numpy() @ replies[c].params[a].numpy())
                for c, n in [(0, 10), (1, 30), (2, 60)]
            )
            / 100
        )
        u, s, vt = np.linalg.svd(avg)
        for cid, rank in enumerate([1, 3, 4]):
            got = sent[cid].params
            assert got[a].shape == (rank, 16) and got[b].shape == (16, rank)
            np.testing.assert_allclose((got[b] @ got[a]).numpy(), (u[:, :rank] * s[:rank]) @ vt[:rank], atol=1e-10)
    # the head is averaged with the same weights: (10 * 1 + 30 * 2 + 60 * 3) / 100 = 2.5
    for h in lo.head_names:
        torch.testing.assert_close(server.global_params[h], torch.full((1,), 2.5, dtype=torch.float64))


def test_flexlora_clients_train_at_their_own_ranks() -> None:
    model = tiny_two_level(personal_rank=0)
    server = FlexLoRAServer(model.initial_common(), model.layout, ranks=[1, 2, 4])
    _, rec, metrics = _engine(server, FlexLoRAClient(model, TRAIN, 3))
    a = next(n for n in model.layout.x_names if ".lora_A." in n)
    assert [r[a].shape[0] for r in rec.replies[-1].values()] == [1, 2, 4]
    assert set(metrics) == {0, 1, 2}


def test_fedex_lora_aggregation_is_exact() -> None:
    model = tiny_two_level(personal_rank=0)  # float64
    lo = model.layout
    base = {m: model.base_weight(m) for m in lo.modules}
    server = FedExLoRAServer(model.initial_common(), lo, base, aggregation="weighted")
    engine, rec, _ = _engine(server, FedExLoRAClient(model, TRAIN, 3), rounds=1)
    before = {k: v.clone() for k, v in engine.server.global_params.items()}
    record = engine.train_round(2)  # one more round, its replies recorded
    replies, n = rec.replies[-1], {c: len(token_clients()[c]) for c in range(3)}
    after = engine.server.global_params
    s = lo.scaling
    for m in lo.modules:
        a, b, d = f"{m}.lora_A.{COMMON}.weight", f"{m}.lora_B.{COMMON}.weight", base_delta_name(m)
        # the aggregated model's effective weight W0 + delta' + s B A ...
        merged = base[m] + after[d] + s * after[b] @ after[a]
        # ... is the weighted average of the clients' W0 + delta + s B_k A_k
        clients = [base[m] + before[d] + s * replies[c][b] @ replies[c][a] for c in range(3)]
        expected = sum(n[c] * w for c, w in enumerate(clients)) / sum(n.values())
        torch.testing.assert_close(merged, expected, rtol=0, atol=1e-12)
        assert after[d].abs().max() > 1e-8  # a real residual (mean of products != product of means)
    # the residual travels to clients with A and B; it is never sent back
    assert any(k.endswith(".base_delta") for k in rec.sent[-1])
    assert not any(k.endswith(".base_delta") for r in replies.values() for k in r)
    assert all(c["parameters_received"] > c["parameters_sent"] for c in record["clients"].values())


def test_a_base_delta_changes_the_frozen_weight_as_if_it_were_added() -> None:
    model = tiny_two_level(personal_rank=0)
    params, batch = model.initial_common(), random_batch()
    m = model.layout.modules[0]
    delta = torch.randn(model.base_weight(m).shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shifted = model.outputs({**params, base_delta_name(m): delta}, batch).logits
    weight = model.model.get_submodule(m).base_layer.weight
    with torch.no_grad():
        weight += delta
    try:
        torch.testing.assert_close(shifted, model.outputs(params, batch).logits)
    finally:
        with torch.no_grad():
            weight -= delta


def test_feddpa_instance_weights_by_hand() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    reference = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # mean cosine similarities 1, 0, -1, 1/sqrt(2); a = 0.5 * sim clipped to [0, 0.5]
    a = torch.tensor([0.5, 0.0, 0.0, 0.5 / 2**0.5])
    torch.testing.assert_close(instance_weights(h, reference, 0.5), torch.stack([1 - a, a], 1))


def _dpa_model() -> TwoLevelModel:
    return TwoLevelModel(
        tiny_bert().double(), Classification(), ["query", "value"], 4, 8, personal_rank=4, personal_lora_alpha=8
    )


def _random_params(model: TwoLevelModel) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    params = {**model.initial_common(), **model.initial_personal(g)}
    return {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if ".lora_B." in k else v) for k, v in params.items()}


def test_feddpa_level_weights_mix_each_example_at_its_own_weight() -> None:
    model, batch = _dpa_model(), random_batch(size=3)
    params = _random_params(model)
    a = torch.tensor([0.0, 0.3, 1.0])
    with model.level_weights(torch.stack([1 - a, a], 1)):
        got = model.outputs(params, batch).logits
    for i in range(3):  # row i as the model at weight a_i: W0 + (1 - a_i) s B_g A_g + a_i s B_l A_l
        torch.testing.assert_close(got[i], model.outputs(mixed(params, float(a[i])), batch).logits[i])
    # a batch k times as large (beam search) repeats each example's weight k times
    wide = {k: v.repeat_interleave(2, dim=0) for k, v in batch.items()}
    with model.level_weights(torch.stack([1 - a, a], 1)):
        torch.testing.assert_close(model.outputs(params, wide).logits, got.repeat_interleave(2, dim=0))


def test_representation_leaves_padding_out() -> None:
    model, batch = _dpa_model(), random_batch(size=2, length=5)
    params = _random_params(model)
    padded = {k: v.clone() for k, v in batch.items()}
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(2, 3, dtype=torch.long)], 1)
    padded["attention_mask"] = torch.cat([batch["attention_mask"], torch.zeros(2, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model.representation(params, padded), model.representation(params, batch))


def test_feddpa_keeps_its_local_adapter_and_evaluates_per_instance() -> None:
    model = _dpa_model()
    client = FedDPAClient(model, TRAIN, FedDPAConfig(), 3)
    engine, rec, metrics = _engine(FedDPAServer(model.initial_common()), client)
    assert not any(".personal." in n for n in _names(rec.sent) | _names(r for rs in rec.replies for r in rs.values()))
    b = next(n for n in model.layout.y_names if ".lora_B." in n)
    assert all(engine.states[c]["personal"][b].abs().sum() > 0 for c in range(3))  # the local adapters trained
    view = engine.client_view(0, engine.server.configure_evaluate(2, [0])[0])
    assert view.config["reference"].shape == (5, 16)  # 5 of the client's examples, hidden size 16
    assert set(metrics) == {0, 1, 2}
    # fixed weighting is the model at lambda; it differs from the instance-weighted one
    fixed = FedDPAClient(model, TRAIN, FedDPAConfig(weighting="fixed"), 3)
    state, data = engine.states[0], token_clients()[0]
    plain = fixed.evaluate(0, fixed.personalize(0, view, state, data), state, data)
    assert plain["loss"] != pytest.approx(client.evaluate(0, view, state, data)["loss"], abs=1e-9)
    # the export is the model at lambda too: global B scaled by 1 - lambda, local B by lambda
    exported = client.exported(view, state)
    g = next(n for n in model.layout.x_names if ".lora_B." in n)
    torch.testing.assert_close(exported[g], 0.5 * view.params[g])
    torch.testing.assert_close(exported[b], 0.5 * state["personal"][b])


def test_instruction_config_carries_no_reference_over_the_wire() -> None:
    """The reference representations are computed on the client for its own evaluation only."""
    model = _dpa_model()
    client = FedDPAClient(model, TRAIN, FedDPAConfig(), 3)
    instruction = Instruction(model.initial_common(), {"server_round": 1})
    view = client.personalize(0, instruction, client.init_state(0), token_clients()[0])
    assert "reference" in view.config and "reference" not in instruction.config
