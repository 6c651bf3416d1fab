"""Per-FedAvg-LoRA's meta-gradient against the hand-derived quadratic case; its personalised
evaluation; the Hessian modes agree on a real (tiny) transformer; it runs on the engine."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import random_batch, tiny_two_level, token_clients

from pf2lora.algorithms.base import Instruction
from pf2lora.algorithms.perfedavg import PerFedAvgClient, PerFedAvgServer
from pf2lora.config import PerFedAvgConfig, TrainConfig
from pf2lora.engines.local import LocalEngine


class Quadratic:
    """f(w; batch) = 1/2 w^T H w - b^T w: gradient H w - b, Hessian H, per batch."""

    device = torch.device("cpu")
    layout = None

    def train(self, mode: bool = True) -> None:
        pass

    def loss(self, params, batch, reduction: str = "mean"):
        w = params["w"]
        return 0.5 * w @ batch["H"] @ w - batch["b"] @ w

    @staticmethod
    def twice_differentiable():
        return contextlib.nullcontext()


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T / n + torch.eye(n, dtype=torch.float64)


def _quadratic_case(hessian: str):
    n, alpha = 4, 0.1
    batches = [
        {"H": _spd(n, s), "b": torch.randn(n, generator=torch.Generator().manual_seed(10 + s), dtype=torch.float64)}
        for s in range(3)
    ]
    client = PerFedAvgClient(Quadratic(), TrainConfig(fd_epsilon=1e-4), PerFedAvgConfig(alpha=alpha, hessian=hessian))
    x0 = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    x = {"w": x0.clone().requires_grad_(True)}
    loss, g = client.meta_gradient(x, *batches)
    (h1, b1), (h2, b2), (h3, _) = ((d["H"], d["b"]) for d in batches)
    # by hand: x' = x - alpha (H1 x - b1); first order: H2 x' - b2; full: (I - alpha H3)(H2 x' - b2)
    inner = x0 - alpha * (h1 @ x0 - b1)
    outer = h2 @ inner - b2
    expected_loss = 0.5 * x0 @ h1 @ x0 - b1 @ x0
    return loss, g["w"], outer, (torch.eye(n, dtype=torch.float64) - alpha * h3) @ outer, expected_loss


def test_first_order_meta_gradient_by_hand() -> None:
    loss, got, first_order, _, expected_loss = _quadratic_case("first_order")
    torch.testing.assert_close(got, first_order)
    assert loss == pytest.approx(expected_loss.item())


@pytest.mark.parametrize("hessian", ["exact", "finite_difference"])
def test_hessian_vector_meta_gradient_by_hand(hessian: str) -> None:
    _, got, first_order, full, _ = _quadratic_case(hessian)
    torch.testing.assert_close(got, full, rtol=1e-7, atol=1e-9)
    assert not torch.allclose(full, first_order)  # the Hessian term is really there


def test_personalize_is_one_sgd_step_on_own_training_data() -> None:
    model = tiny_two_level(personal_rank=0)
    client = PerFedAvgClient(model, TrainConfig(batch_size=4), PerFedAvgConfig(alpha=0.5), seed=3)
    data = token_clients(1, 4)[0]  # batch_size = the whole split, so the step is deterministic
    params = {k: v + 0.01 for k, v in model.initial_common().items()}
    adapted = client.personalize(0, Instruction(params, {"server_round": 1}), client.init_state(0), data)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    model.train(True)
    grads = torch.autograd.grad(model.loss(leaves, data.batch([0, 1, 2, 3])), list(leaves.values()))
    for (k, v), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(adapted.params[k], v - 0.5 * g)
    # without training data (e.g. a pooled method) nothing changes
    assert client.personalize(0, Instruction(params), {}, None).params is params


def test_exact_and_finite_difference_agree_on_a_transformer() -> None:
    model = tiny_two_level(personal_rank=0, dropout=0.1)
    model.train(True)
    common = {k: v + 0.05 * torch.randn_like(v) for k, v in model.initial_common().items()}
    d1, d2, d3 = (random_batch(seed=s) for s in (1, 2, 3))
    grads = {}
    for mode in ("exact", "finite_difference", "first_order"):
        client = PerFedAvgClient(model, TrainConfig(fd_epsilon=1e-4), PerFedAvgConfig(alpha=0.5, hessian=mode))
        torch.manual_seed(0)
        x = {k: v.clone().requires_grad_(True) for k, v in common.items()}
        _, g = client.meta_gradient(x, d1, d2, d3)
        grads[mode] = torch.cat([g[k].flatten() for k in sorted(g)])
    cos = torch.nn.functional.cosine_similarity(grads["exact"], grads["finite_difference"], dim=0)
    assert cos > 0.999
    assert (grads["exact"] - grads["first_order"]).norm() > 1e-6 * grads["exact"].norm()


def test_per_fedavg_on_the_engine_evaluates_the_personalised_model() -> None:
    model = tiny_two_level(personal_rank=0, dropout=0.1)
    data = token_clients()
    client = PerFedAvgClient(model, TrainConfig(local_steps=2, batch_size=4), PerFedAvgConfig(alpha=0.5), seed=1)
    engine = LocalEngine(PerFedAvgServer(model.initial_common()), client, data, data)
    metrics, _ = engine.run(2)
    assert set(metrics) == {0, 1, 2}
    # the personalised view differs from the global adapter, the global one does not move
    instruction = engine.server.configure_evaluate(2, [0])[0]
    before = {k: v.clone() for k, v in engine.server.global_params.items()}
    view = engine.client_view(0, instruction)
    assert any(not torch.equal(view.params[k], before[k]) for k in before)
    assert all(torch.equal(engine.server.global_params[k], before[k]) for k in before)
