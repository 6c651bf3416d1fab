"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018), around any server that
averages what its clients send back.

Each round every client takes part independently with probability ``q`` (``train.client_fraction``;
Poisson sampling, which the accountant's amplification assumes); each sampled client's update of
what it sends back, ``Delta_k = x_k - x``, is clipped to L2 norm ``C``; the server adds Gaussian
noise of standard deviation ``sigma C`` to their sum and divides by the expected number of clients
``m = q M``, whoever failed or was rejected:

    x <- x + (sum_k Delta_k min(1, C / ||Delta_k||) + N(0, sigma^2 C^2 I)) / m

Every round's release is then the sampled Gaussian mechanism with noise multiplier ``sigma``; the
privacy spent after ``T`` rounds (epsilon at ``delta``) comes from Google's ``dp-accounting`` RDP
accountant (:func:`privacy_spent`). What it protects: any one client's participation, as seen in
the common parameters the server releases. A client's personal adapter never leaves it; the
evaluation metrics clients report are not noised. The noise and the sampling come from the
operating system's secure randomness unless ``dp.noise_seed`` asks for reproducible ones.

On Flower each client also clips its own update before it leaves (Flower's ``fixedclipping_mod``,
see :mod:`pf2lora.engines.flower.client_app`); the server clips again, a no-op for an honest client.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Any

import torch

from pf2lora.algorithms.base import Instruction, Params, ServerAlgorithm, TrainResult
from pf2lora.utils import generator

CLIPPING_NORM = "clipping_norm"  # the instruction's config key (Flower's differential_privacy.KEY_CLIPPING_NORM)


class DPFedAvgServer(ServerAlgorithm):
    """``inner`` (a server that averages, built to send every client each round) with DP-FedAvg's
    sampling, clipping and noise."""

    def __init__(
        self,
        inner: ServerAlgorithm,
        clip: float,
        noise_multiplier: float,
        sampling_rate: float,
        noise_seed: int | None = None,
    ) -> None:
        self.inner, self.clip, self.noise_multiplier, self.q = inner, clip, noise_multiplier, sampling_rate
        self.noise_seed = noise_seed
        self.expected = 1.0  # m = q M, set from the clients each round
        self.trained: list[str] = []  # the names clients send back (noise goes on each)

    def _random(self, server_round: int, what: str) -> torch.Generator:
        if self.noise_seed is not None:
            return generator(self.noise_seed, "dp", what, server_round)
        return torch.Generator().manual_seed(secrets.randbits(63))

    def configure_train(self, server_round: int, client_ids: list[int]) -> dict[int, Instruction]:
        instructions = {  # the clipping norm told: on Flower each client clips its own update too
            cid: Instruction(i.params, {**i.config, CLIPPING_NORM: self.clip})
            for cid, i in self.inner.configure_train(server_round, client_ids).items()
        }
        self.expected = self.q * len(client_ids)
        self.trained = sorted(k for k, v in next(iter(instructions.values())).params.items() if v.is_floating_point())
        if self.q >= 1:
            return instructions
        chosen = torch.rand(len(client_ids), generator=self._random(server_round, "clients")) < self.q
        return {cid: instructions[cid] for cid, take in zip(client_ids, chosen.tolist(), strict=True) if take}

    def aggregate_train(self, server_round: int, results: dict[int, TrainResult]) -> None:
        current = self.inner.global_params
        total = {k: torch.zeros_like(current[k], dtype=torch.float64) for k in self.trained}
        for cid in sorted(results):
            delta = {k: results[cid].params[k].double() - current[k].double() for k in self.trained}
            norm = math.sqrt(sum(float(d.square().sum()) for d in delta.values()))
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            for k in self.trained:
                total[k] += scale * delta[k]
        noise = self._random(server_round, "noise")
        std = self.noise_multiplier * self.clip
        new = dict(current)
        for k in self.trained:
            noisy = total[k] + std * torch.randn(total[k].shape, generator=noise, dtype=torch.float64)
            new[k] = (current[k].double() + noisy / self.expected).to(current[k].dtype)
        self.inner.load_state({**self.inner.state(), "params": new})

    def configure_evaluate(self, server_round: int, client_ids: list[int]) -> dict[int, Instruction]:
        return self.inner.configure_evaluate(server_round, client_ids)

    def check_reply(self, instruction: Instruction, reply: TrainResult) -> str | None:
        return self.inner.check_reply(instruction, reply)

    @property
    def global_params(self) -> Params:
        return self.inner.global_params

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.inner.load_state(state)


def privacy_spent(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` releases of the Poisson-sampled Gaussian mechanism
    (``dp-accounting``'s RDP accountant; infinite without noise)."""
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from dp_accounting import dp_event, rdp

    absl = logging.getLogger("absl")  # it warns of each RDP order it leaves out (not converged): the bound holds
    level, absl.level = absl.level, logging.ERROR
    try:
        accountant = rdp.RdpAccountant()
        release = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(noise_multiplier))
        accountant.compose(release, rounds)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


def accounting_available() -> str | None:
    """Why the privacy spent cannot be computed here (None: it can)."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError as err:
        return f"dp.enabled needs the dp-accounting package: pip install 'pf2lora[dp]' ({err})"
    return None
