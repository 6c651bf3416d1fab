"""HETLoRA: rank formula, truncation, zero-padded sparsity-weighted aggregation, pruning rule."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_two_level

from pf2lora.adapters.two_level import AdapterLayout
from pf2lora.algorithms.base import Instruction, TrainResult
from pf2lora.algorithms.hetlora import (
    HetLoRAClient,
    HetLoRAServer,
    initial_ranks,
    pad,
    tail_norm,
    truncate,
)
from pf2lora.config import ConfigError, HetLoRAConfig, TrainConfig, load_config
from pf2lora.data.text import TokenizedData

A, B = "m.lora_A.common.weight", "m.lora_B.common.weight"
LAYOUT = AdapterLayout(
    ("m",), rank=3, personal_rank=0, scaling=1.0, personal_scaling=0.0, head_names=("head.weight",), head="shared"
)


def test_initial_rank_formula() -> None:
    # r_k = r_min + floor((r_max - r_min)(k - 1) / M), k = 1..M
    assert initial_ranks(4, 8, 12) == [8, 9, 10, 11]
    assert initial_ranks(3, 1, 12) == [1, 4, 8]
    assert initial_ranks(2, 1, 12, [2, 10]) == [2, 10]


def test_truncation_and_padding_by_hand() -> None:
    a = torch.arange(6.0).reshape(3, 2)  # r_max x n
    b = torch.arange(6.0).reshape(2, 3)  # m x r_max
    t = truncate({A: a, B: b, "head.weight": torch.ones(1)}, 2)
    torch.testing.assert_close(t[A], torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    torch.testing.assert_close(t[B], torch.tensor([[0.0, 1.0], [3.0, 4.0]]))
    torch.testing.assert_close(t["head.weight"], torch.ones(1))
    p = pad(t, 3)
    torch.testing.assert_close(p[A], torch.tensor([[0.0, 1.0], [2.0, 3.0], [0.0, 0.0]]))
    torch.testing.assert_close(p[B], torch.tensor([[0.0, 1.0, 0.0], [3.0, 4.0, 0.0]]))


def test_sparsity_weighted_aggregation_of_different_ranks_by_hand() -> None:
    # client 0, rank 1: B0 A0 = [[2, 0], [0, 0]], ||dW0|| = 2
    # client 1, rank 2: B1 A1 = [[0, 0], [3, 0]], ||dW1|| = 3  ->  p = (2/5, 3/5)
    server = HetLoRAServer({A: torch.zeros(3, 2), B: torch.zeros(2, 3), "head.weight": torch.zeros(1)}, LAYOUT, [1, 2])
    replies = {
        0: TrainResult(
            {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[2.0], [0.0]]), "head.weight": torch.tensor([1.0])},
            10,
            {"rank": 1},
        ),
        1: TrainResult(
            {
                A: torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
                B: torch.tensor([[0.0, 0.0], [0.0, 3.0]]),
                "head.weight": torch.tensor([3.0]),
            },
            10,
            {"rank": 2},
        ),
    }
    server.aggregate_train(1, replies)
    g = server.global_params
    # A = 0.4 [[1,0],[0,0],[0,0]] + 0.6 [[0,1],[1,0],[0,0]];  B = 0.4 [[2,0,0],[0,0,0]] + 0.6 [[0,0,0],[0,3,0]]
    torch.testing.assert_close(g[A], torch.tensor([[0.4, 0.6], [0.6, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(g[B], torch.tensor([[0.8, 0.0, 0.0], [0.0, 1.8, 0.0]]))
    torch.testing.assert_close(g["head.weight"], torch.tensor([2.0]))  # the head: plain mean
    # each client is sent a payload of its own rank
    instructions = server.configure_train(2, [0, 1])
    assert instructions[0].params[A].shape == (1, 2) and instructions[0].config["rank"] == 1
    assert instructions[1].params[B].shape == (2, 2) and instructions[1].config["rank"] == 2


def test_self_pruning_term_has_a_gradient_on_the_tail_only() -> None:
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    value = tail_norm({A: a, B: b}, ("m",), q=2)
    torch.testing.assert_close(value, torch.linalg.norm(b[:, 2:]) * torch.linalg.norm(a[2:]))
    value.backward()
    assert a.grad[2:].abs().sum() > 0 and b.grad[:, 2:].abs().sum() > 0
    assert a.grad[:2].abs().sum() == 0 and b.grad[:, :2].abs().sum() == 0


def _data() -> TokenizedData:
    g = torch.Generator().manual_seed(2)
    return TokenizedData(
        torch.randint(1, 60, (32, 5), generator=g).tolist(), None, torch.randint(0, 3, (32,), generator=g).numpy(), 0
    )


def _client_round(penalty: float, gamma: float, b_scale: float) -> TrainResult:
    model = tiny_two_level(personal_rank=0)
    x = model.initial_common()
    x = {k: (torch.randn_like(v) * b_scale if ".lora_B." in k else v) for k, v in x.items()}
    client = HetLoRAClient(
        model,
        TrainConfig(local_steps=5, batch_size=4, lr=1e-2),
        HetLoRAConfig(r_min=1, r_max=4, gamma=gamma, penalty=penalty),
    )
    instruction = Instruction(truncate(x, 4), {"server_round": 1, "rank": 4})
    result, _ = client.train(0, instruction, client.init_state(0), _data())
    return result


def test_pruning_rule() -> None:
    # a strong penalty shrinks the tail from its value at receipt: prune to max(r_min, ceil(0.5 * 4)) = 2
    pruned = _client_round(penalty=10.0, gamma=0.5, b_scale=1.0)
    assert pruned.metrics["rank"] == 2
    assert all(t.shape[0] == 2 for k, t in pruned.params.items() if ".lora_A." in k)
    # B = 0 at receipt: the tail norm starts at 0 and cannot fall, so no pruning
    assert _client_round(penalty=10.0, gamma=0.5, b_scale=0.0).metrics["rank"] == 4
    # gamma = 1: q = r_k, the tail is empty, nothing to prune
    assert _client_round(penalty=10.0, gamma=1.0, b_scale=1.0).metrics["rank"] == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hetlora.r_min=9", "hetlora.r_max=8"], r"r_min \(9\) must not exceed hetlora.r_max \(8\)"),
        (["data.num_clients=3", "hetlora.ranks=[8,9]"], "hetlora.ranks has 2 entries for 3 clients"),
        (["hetlora.gamma=0"], r"gamma must be in \(0, 1\]"),
        (["hetlora.gamma=1.5"], r"gamma must be in \(0, 1\]"),
        (["data.num_clients=2", "hetlora.ranks=[8,13]"], r"outside \[r_min, r_max\]"),
    ],
)
def test_bad_hetlora_config(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
