"""PF2LoRA: a common adapter x averaged across clients, a personal adapter y_k per client, trained as
the bilevel problem ``min_x sum_k F_k(x, y_k*(x))``, ``y_k*(x) = argmin_y F_k(x, y)``
(arXiv 2503.03920, eq. 3 and 4, Algorithm 1).

Per local step t, with two different minibatches pi (lower) and xi (upper):

    y_{t+1} = y_t - alpha * grad_y F(x_t, y_t; pi)                                      (SGD)
    h_t     = grad_x F(x_t, y_{t+1}; xi) - alpha * grad2_xy F(x_t, y_t; pi) . grad_y F(x_t, y_{t+1}; xi)
    x_{t+1} = AdamW(x_t, h_t)

The sign is minus (eq. 4, Algorithm 1; eq. 6's '+' is a typo): h_t is exactly the gradient of
``x -> F(x, y_t - alpha grad_y F(x, y_t; pi); xi)``. Modes of ``hypergradient``:

- ``exact``: autograd through that one unrolled step (double backward);
- ``finite_difference`` (default): the mixed term as
  ``[grad_x F(x, y + eps v; pi) - grad_x F(x, y; pi)] / eps`` with ``v = grad_y F(x, y_{t+1}; xi)``
  and ``eps = fd_epsilon / ||v||``; ``grad_x F(x, y; pi)`` comes free with the lower-level
  backward, so a step is 3 forward+backward passes. The two pi passes see the same dropout masks,
  kept from the first and reused by the third rather than drawn again
  (:class:`~pf2lora.adapters.dropout.DropoutMasks`), so the difference sees only the change of y;
- ``first_order``: drop the mixed term (2 passes);
- ``joint``: the "without bilevel optimisation" ablation (Appendix F.2): one pass at
  (x_t, y_t), y takes the SGD step and x the AdamW step from the same gradients.

The server averages x every I steps (:class:`FedAvgServer`); y_k never leaves the client.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from pf2lora.adapters.dropout import DropoutMasks
from pf2lora.adapters.rank import personal_to_common
from pf2lora.adapters.two_level import TwoLevelModel
from pf2lora.algorithms.base import Batch, ClientData, ClientState, Instruction, Params
from pf2lora.algorithms.fedavg import FedAvgServer
from pf2lora.algorithms.lora_client import LoRAClient, lora_model
from pf2lora.config import ExperimentConfig
from pf2lora.precision import fd_epsilon
from pf2lora.tasks.base import Task
from pf2lora.utils import clone_params, fork_rng, generator, l2_norm, rng_state, set_rng_state


class PF2LoRAServer(FedAvgServer):
    """Averages the common adapter x only; it never sees a personal adapter."""


def _dot(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


class PF2LoRAClient(LoRAClient):
    """Lower level SGD on y_k, upper level AdamW on x with the hypergradient."""

    def init_state(self, client_id: int) -> ClientState:
        state = super().init_state(client_id)
        state["personal"] = self.model.initial_personal(generator(self.seed, "personal", client_id))
        return state

    def end_round(
        self, instruction: Instruction, x: dict[str, Tensor], state: ClientState
    ) -> tuple[Params, dict[str, float]]:
        """x goes back; the size of the personal update beside this client's common one is recorded
        (``personal_to_common``: ~0 when the lower level does not move y, ~1 when y does as much as x)."""
        params, metrics = super().end_round(instruction, x, state)
        with torch.no_grad():
            metrics["personal_to_common"] = personal_to_common(self.model.layout, {**x, **state["personal"]})
        return params, metrics

    def local_step(self, client_id: int, x: dict[str, Tensor], state: ClientState, data: ClientData) -> float:
        b, mode = self.cfg.batch_size, self.cfg.hypergradient
        # pi, xi (and zeta) are consecutive draws, each padded only to its own longest example
        pi = self.next_batch(client_id, state, data, b)
        if mode == "joint":
            loss, h, state["personal"] = self.joint_step(x, state["personal"], pi)
        else:
            xi = self.next_batch(client_id, state, data, b)
            zeta = self.next_batch(client_id, state, data, b) if self.cfg.independent_mixed_batch else None
            loss, h, state["personal"] = self.bilevel_step(x, state["personal"], pi, xi, zeta, mode)
        for k, leaf in x.items():
            leaf.grad = h[k]
        return loss

    # ------------------------------------------------------------------ one step
    def bilevel_step(
        self,
        x: dict[str, Tensor],
        y: Params,
        pi: Batch,
        xi: Batch,
        zeta: Batch | None,
        mode: str,
    ) -> tuple[float, dict[str, Tensor], Params]:
        """One lower SGD step on y and the hypergradient h for x. Returns (loss at pi, h, y_{t+1})."""
        alpha = self.cfg.lower_lr
        if mode == "exact":
            with self.model.twice_differentiable():
                return self._exact(x, y, pi, xi, zeta)
        xs, ys = list(x), list(y)
        y_leaf = {k: v.detach().requires_grad_(True) for k, v in y.items()}
        rng, masks = rng_state(self.model.device), DropoutMasks()
        replays_pi = mode == "finite_difference" and zeta is None  # pass 3 reuses pi's dropout masks
        with masks.record() if replays_pi else contextlib.nullcontext():
            loss_pi = self.model.loss({**x, **y_leaf}, pi)
        grads = torch.autograd.grad(loss_pi, [x[k] for k in xs] + [y_leaf[k] for k in ys])
        gx_pi = dict(zip(xs, grads[: len(xs)], strict=True))
        y_next = {k: (y[k] - alpha * g).detach() for k, g in zip(ys, grads[len(xs) :], strict=True)}

        y_next_leaf = {k: v.requires_grad_(True) for k, v in clone_params(y_next).items()}
        loss_xi = self.model.loss({**x, **y_next_leaf}, xi)
        grads = torch.autograd.grad(loss_xi, [x[k] for k in xs] + [y_next_leaf[k] for k in ys])
        h = dict(zip(xs, grads[: len(xs)], strict=True))
        if mode == "first_order":
            return loss_pi.item(), h, y_next
        v = dict(zip(ys, grads[len(xs) :], strict=True))
        mixed = self._mixed_fd(
            x, y, v, zeta if zeta is not None else pi, None if zeta is not None else gx_pi, rng, masks
        )
        return loss_pi.item(), {k: h[k] - alpha * mixed[k] for k in xs}, y_next

    def _mixed_fd(
        self,
        x: dict[str, Tensor],
        y: Params,
        v: Params,
        batch: Batch,
        gx_at_y: dict[str, Tensor] | None,
        rng: tuple[Tensor, Tensor | None],
        masks: DropoutMasks,
    ) -> dict[str, Tensor]:
        """``grad2_xy F(x, y; batch) . v`` by a forward difference of x-gradients along v; ``masks``
        holds the dropout masks of the pass at (x, y) (recorded here for an independent zeta), and
        ``rng`` the RNG state from before that pass."""
        norm = l2_norm(v)
        if norm == 0:
            return {k: torch.zeros_like(t) for k, t in x.items()}
        eps = fd_epsilon(self.cfg.fd_epsilon, self.model, y) / norm
        xs = list(x)
        device = self.model.device
        with fork_rng(device):
            if gx_at_y is None:  # independent zeta: grad_x F(x, y; zeta) costs one more pass
                set_rng_state(device, rng)
                with masks.record():
                    loss = self.model.loss({**x, **y}, batch)
                gx_at_y = dict(zip(xs, torch.autograd.grad(loss, [x[k] for k in xs]), strict=True))
            y_pert = {k: y[k] + eps * v[k] for k in y}
            with masks.replay(rng, device):  # the dropout masks of the pass at (x, y), not drawn again
                loss = self.model.loss({**x, **y_pert}, batch)
            g = torch.autograd.grad(loss, [x[k] for k in xs])
        return {k: (gk - gx_at_y[k]) / eps for k, gk in zip(xs, g, strict=True)}

    def _exact(
        self, x: dict[str, Tensor], y: Params, pi: Batch, xi: Batch, zeta: Batch | None
    ) -> tuple[float, dict[str, Tensor], Params]:
        """Autograd through the unrolled lower step (double backward)."""
        alpha, xs, ys = self.cfg.lower_lr, list(x), list(y)
        y_leaf = {k: v.detach().requires_grad_(True) for k, v in y.items()}
        loss_pi = self.model.loss({**x, **y_leaf}, pi)
        if zeta is None:
            gy = torch.autograd.grad(loss_pi, [y_leaf[k] for k in ys], create_graph=True)
            y_next = {k: y_leaf[k] - alpha * g for k, g in zip(ys, gy, strict=True)}
            loss_xi = self.model.loss({**x, **y_next}, xi)
            h = dict(zip(xs, torch.autograd.grad(loss_xi, [x[k] for k in xs]), strict=True))
            return loss_pi.item(), h, {k: t.detach() for k, t in y_next.items()}
        # independent zeta: lower step on pi, Hessian-vector product on zeta by double backward
        gy = torch.autograd.grad(loss_pi, [y_leaf[k] for k in ys])
        y_next = {k: (y[k] - alpha * g).detach() for k, g in zip(ys, gy, strict=True)}
        y_next_leaf = {k: v.clone().requires_grad_(True) for k, v in y_next.items()}
        loss_xi = self.model.loss({**x, **y_next_leaf}, xi)
        grads = torch.autograd.grad(loss_xi, [x[k] for k in xs] + [y_next_leaf[k] for k in ys])
        h = dict(zip(xs, grads[: len(xs)], strict=True))
        v = {k: g.detach() for k, g in zip(ys, grads[len(xs) :], strict=True)}
        gy_z = torch.autograd.grad(self.model.loss({**x, **y_leaf}, zeta), [y_leaf[k] for k in ys], create_graph=True)
        mixed = torch.autograd.grad(_dot(dict(zip(ys, gy_z, strict=True)), v), [x[k] for k in xs], allow_unused=True)
        for k, m in zip(xs, mixed, strict=True):
            if m is not None:
                h[k] = h[k] - alpha * m
        return loss_pi.item(), h, y_next

    def joint_step(self, x: dict[str, Tensor], y: Params, batch: Batch) -> tuple[float, dict[str, Tensor], Params]:
        """Ablation without the bilevel step: both levels from the gradients at (x_t, y_t)."""
        xs, ys = list(x), list(y)
        y_leaf = {k: v.detach().requires_grad_(True) for k, v in y.items()}
        loss = self.model.loss({**x, **y_leaf}, batch)
        grads = torch.autograd.grad(loss, [x[k] for k in xs] + [y_leaf[k] for k in ys])
        h = dict(zip(xs, grads[: len(xs)], strict=True))
        y_next = {k: (y[k] - self.cfg.lower_lr * g).detach() for k, g in zip(ys, grads[len(xs) :], strict=True)}
        return loss.item(), h, y_next


def build(cfg: ExperimentConfig, base: nn.Module, task: Task) -> tuple[PF2LoRAServer, PF2LoRAClient, TwoLevelModel]:
    model = lora_model(cfg, base, task, personal=True)
    t = cfg.train
    return (
        PF2LoRAServer(model.initial_common(), t.aggregation, t.client_fraction, cfg.seed),
        PF2LoRAClient(model, t, cfg.seed),
        model,
    )
