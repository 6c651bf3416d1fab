"""The server's checks of client updates: every kind of bad update is rejected with its reason and
recorded, the round's aggregate is that of the good updates, too few good updates stop the round,
and HETLoRA's pruned ranks pass where they are what the client reports."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_two_level, token_clients

from pf2lora.algorithms.base import ClientState, Instruction, TrainResult
from pf2lora.algorithms.hetlora import HetLoRAServer, truncate
from pf2lora.algorithms.homlora import HomLoRAClient, HomLoRAServer
from pf2lora.algorithms.validation import problem, spoil, update_norm
from pf2lora.config import SPOILS, TrainConfig, load_config
from pf2lora.engines.local import LocalEngine, RoundFailed
from pf2lora.utils import weighted_average

REASONS = {
    "nan": "non-finite values",
    "inf": "non-finite values",
    "shape": "has shape",
    "missing": "missing ",
    "personal": ".personal",
    "dtype": "has dtype float32, expected float64",  # the tiny model computes in float64
    "far": "exceeds the bound 10",
}


class _Spoils(HomLoRAClient):
    """HOMLoRA, except that client 1 sends a bad update of kind ``kind``; every reply is kept."""

    def __init__(self, *args, kind: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kind, self.replies = kind, {}

    def train(self, client_id: int, instruction: Instruction, state: ClientState, data):  # type: ignore[override]
        result, state = super().train(client_id, instruction, state, data)
        params = result.params
        if client_id == 1 and self.kind is not None:
            params = spoil(params, self.kind)
        self.replies[client_id] = params
        return TrainResult(params, result.num_examples, result.metrics), state


def _engine(kind: str | None, **kwargs) -> tuple[LocalEngine, _Spoils]:
    model = tiny_two_level(personal_rank=0)
    client = _Spoils(model, TrainConfig(local_steps=2, batch_size=4), kind=kind)
    data = token_clients(3)
    return LocalEngine(HomLoRAServer(model.initial_common()), client, data, data, **kwargs), client


@pytest.mark.parametrize("kind", SPOILS)
def test_a_bad_update_is_rejected_recorded_and_left_out_of_the_aggregate(kind: str) -> None:
    engine, client = _engine(kind, norm_bound=10.0)
    record = engine.train_round(1)
    assert set(record["rejected"]) == {1} and REASONS[kind] in record["rejected"][1]
    assert set(record["clients"]) == {0, 2}
    expected = weighted_average([client.replies[0], client.replies[2]], [1.0, 1.0])
    assert set(engine.server.global_params) == set(expected)
    for name, value in expected.items():
        assert torch.equal(engine.server.global_params[name], value), name


def test_good_updates_pass_within_the_bound_and_too_few_good_ones_stop_the_round() -> None:
    engine, client = _engine(None, norm_bound=10.0)
    record = engine.train_round(1)
    assert "rejected" not in record and set(record["clients"]) == {0, 1, 2}
    sent = engine.server.configure_train(2, [0])[0].params
    assert update_norm(sent, sent) == 0.0
    engine, _ = _engine("nan", min_replies=3)
    with pytest.raises(RoundFailed, match=r"round 1: 2 of 3 clients' updates .* at least 3 needed \(client 1: "):
        engine.train_round(1)


def test_hetlora_replies_may_prune_to_the_rank_they_report() -> None:
    model = tiny_two_level(personal_rank=0)
    initial = model.initial_common()
    server = HetLoRAServer(initial, model.layout, [4, 4])
    instruction = server.configure_train(1, [0])[0]
    pruned = truncate(instruction.params, 2)
    assert problem(server, instruction, TrainResult(pruned, 4, {"rank": 2}), None) is None
    assert "has shape" in (problem(server, instruction, TrainResult(pruned, 4, {"rank": 3}), None) or "")
    assert "reported rank 5" in (problem(server, instruction, TrainResult(pruned, 4, {"rank": 5}), None) or "")
    assert "reported rank None" in (problem(server, instruction, TrainResult(pruned, 4, {}), None) or "")


def test_a_norm_bound_that_is_not_positive_is_refused() -> None:
    from pf2lora.config import ConfigError

    with pytest.raises(ConfigError, match="train.update_norm_bound must be > 0"):
        load_config(None, ["train.update_norm_bound=0"])
