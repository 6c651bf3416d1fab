"""PF2LoRA: the hypergradient of eq. 4 in every mode, and what a client sends."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_two_level

from pf2lora.algorithms.base import Instruction
from pf2lora.algorithms.pf2lora import PF2LoRAClient, PF2LoRAServer
from pf2lora.config import TrainConfig
from pf2lora.data.text import TokenizedData
from pf2lora.tasks.classification import Classification

ALPHA = 20.0  # a large lower-level step makes the mixed term large, so the checks can fail


def _point(model, seed: int = 3):
    """A random (x, y) away from initialisation, so every term is non-zero."""
    g = torch.Generator().manual_seed(seed)
    x = {k: v + 1.0 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.initial_common().items()}
    y = {k: v + 1.0 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.initial_personal(g).items()}
    return x, y


def _hypergradient(model, x, y, mode: str, fd_epsilon: float = 1e-6, seed: int = 0):
    client = PF2LoRAClient(model, TrainConfig(lower_lr=ALPHA, hypergradient=mode, fd_epsilon=fd_epsilon))
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    torch.manual_seed(seed)
    _, h, y_next = client.bilevel_step(leaves, y, random_batch(seed=1), random_batch(seed=2), None, mode)
    return torch.cat([h[k].flatten() for k in sorted(h)]), y_next


def _eq4_term_by_term(model, x, y):
    """h = grad_x F(x, y1; xi) - alpha * grad2_xy F(x, y; pi) . grad_y F(x, y1; xi), y1 = y - alpha grad_y F(x, y; pi),
    each term by its own autograd call."""
    with model.twice_differentiable():
        return _eq4(model, x, y)


def _eq4(model, x, y):
    pi, xi = random_batch(seed=1), random_batch(seed=2)
    xs, ys = sorted(x), sorted(y)
    xl = {k: x[k].clone().requires_grad_(True) for k in xs}
    yl = {k: y[k].clone().requires_grad_(True) for k in ys}
    gy_pi = torch.autograd.grad(model.loss({**xl, **yl}, pi), [yl[k] for k in ys], create_graph=True)
    y1 = {k: (y[k] - ALPHA * g).detach().requires_grad_(True) for k, g in zip(ys, gy_pi)}
    grads = torch.autograd.grad(model.loss({**xl, **y1}, xi), [xl[k] for k in xs] + [y1[k] for k in ys])
    gx_xi, v = grads[: len(xs)], grads[len(xs) :]
    inner = sum((g * vk.detach()).sum() for g, vk in zip(gy_pi, v))
    mixed = torch.autograd.grad(inner, [xl[k] for k in xs])
    return (
        torch.cat([(gx - ALPHA * m).flatten() for gx, m in zip(gx_xi, mixed)]),
        torch.cat([g.flatten() for g in gx_xi]),
        y1,
    )


def test_exact_equals_eq4_term_by_term() -> None:
    model = tiny_two_level()
    model.train(False)
    x, y = _point(model)
    exact, y_next = _hypergradient(model, x, y, "exact")
    reference, first_order_term, y1 = _eq4_term_by_term(model, x, y)
    torch.testing.assert_close(exact, reference, rtol=1e-9, atol=1e-12)
    for k in y1:
        torch.testing.assert_close(y_next[k], y1[k].detach())
    # the mixed term is not negligible here, so the sign and the factor alpha are really checked
    assert (reference - first_order_term).norm() > 0.2 * reference.norm()


def test_finite_difference_matches_exact() -> None:
    model = tiny_two_level()
    model.train(False)
    x, y = _point(model)
    exact, _ = _hypergradient(model, x, y, "exact")
    fd, _ = _hypergradient(model, x, y, "finite_difference")
    first_order, _ = _hypergradient(model, x, y, "first_order")
    assert torch.nn.functional.cosine_similarity(exact, fd, dim=0) >= 0.999
    # and far closer to exact than dropping the mixed term is
    assert (fd - exact).norm() < 1e-3 * (first_order - exact).norm()


def test_finite_difference_replays_dropout_masks() -> None:
    model = tiny_two_level(dropout=0.2)
    model.train(True)
    x, y = _point(model)
    exact, _ = _hypergradient(model, x, y, "exact", seed=7)
    fd, _ = _hypergradient(model, x, y, "finite_difference", seed=7)
    assert torch.nn.functional.cosine_similarity(exact, fd, dim=0) >= 0.999


def test_first_order_drops_the_mixed_term() -> None:
    model = tiny_two_level()
    model.train(False)
    x, y = _point(model)
    first_order, _ = _hypergradient(model, x, y, "first_order")
    _, first_order_term, _ = _eq4_term_by_term(model, x, y)
    torch.testing.assert_close(first_order, first_order_term)


def _client_data(n: int = 40) -> TokenizedData:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 60, (n, 6), generator=g).tolist()
    return TokenizedData(ids, None, torch.randint(0, 3, (n,), generator=g).numpy(), 0)


@pytest.mark.parametrize("mode", ["exact", "finite_difference", "first_order", "joint"])
def test_client_sends_only_the_common_adapter(mode: str) -> None:
    model = tiny_two_level(dropout=0.1)
    client = PF2LoRAClient(model, TrainConfig(local_steps=3, batch_size=4, lower_lr=0.5, hypergradient=mode))
    server = PF2LoRAServer(model.initial_common())
    state = client.init_state(0)
    y0 = {k: v.clone() for k, v in state["personal"].items()}
    result, state = client.train(0, server.configure_train(1, [0])[0], state, _client_data())
    assert set(result.params) == set(model.layout.x_names)
    assert not any("personal" in name for name in result.params)
    assert not set(result.params) & set(state["personal"])
    assert any(not torch.equal(y0[k], state["personal"][k]) for k in y0)  # y_k was trained
    assert any(not torch.equal(result.params[k], server.global_params[k]) for k in result.params)


def test_personal_head_stays_on_the_client() -> None:
    from conftest import tiny_bert

    from pf2lora.adapters.two_level import TwoLevelModel

    model = TwoLevelModel(tiny_bert().double(), Classification(), ["query"], 4, 8, personal_rank=2, head="personal")
    client = PF2LoRAClient(model, TrainConfig(local_steps=2, batch_size=4))
    result, state = client.train(
        0, Instruction(model.initial_common(), {"server_round": 1}), client.init_state(0), _client_data()
    )
    assert not any("classifier" in n for n in result.params)
    assert any("classifier" in n for n in state["personal"])


def test_training_is_reproducible_and_state_resumes() -> None:
    def run() -> dict[str, torch.Tensor]:
        model = tiny_two_level(dropout=0.1)
        client = PF2LoRAClient(model, TrainConfig(local_steps=2, batch_size=4, lower_lr=0.5), seed=3)
        server = PF2LoRAServer(model.initial_common())
        state = client.init_state(1)
        for r in (1, 2):
            result, state = client.train(1, server.configure_train(r, [1])[1], state, _client_data())
            server.aggregate_train(r, {1: result})
        assert state["cursor"] == {"epoch": 0, "pos": 32}  # 2 rounds x 2 steps x (pi, xi) x 4
        return {**server.global_params, **state["personal"]}

    first, second = run(), run()
    for k in first:
        torch.testing.assert_close(first[k], second[k], rtol=0, atol=0)
