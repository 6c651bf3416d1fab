"""The synthetic rank-recovery experiment (PF2LoRA paper, Section 5, Appendix K, Figure 2).

Two clients, multivariate linear regression ``Y_k = X_k W*_k + noise`` (10 x 10, ranks 3 and 4,
noise std 0.1 and 0.2, X ~ N(0, 1), 1000 rows of which the first 700 train). HETLoRA (ranks 2
and 10 in [r_min, r_max] = [1, 12], B zero-initialised, lambda 0.1, tail = last 30%, lr 0.002) and
PF2LoRA (r = 4, r~ = 2, every factor N(0, 1) with the row space of C_k orthogonal to that of A,
upper lr 0.005, lower lr 0.002) train for 2000 steps with communication every 10, through
:class:`LocalEngine` and the very client and server classes that train transformers; only the
model (:class:`LinearLowRankModel`) differs. Losses are ``||y - x W||^2`` per example (averaged), so
the noise floor of client k is ``m sigma_k^2`` (0.1 and 0.4).

``truth`` chooses the ground truth:

- ``independent`` (the paper's text): ``W*_k = A*_k B*_k`` with independent N(0, 1)
  factors. A shared rank-r common part plus rank-r~ personal parts cannot fit two unrelated
  matrices: ``sum_k ||W_k - W*_k||^2 >= 1/2 sum_{i > 2 r~} sigma_i^2(W*_1 - W*_2)``, because
  ``W_1 - W_2 = D_1 C_1 - D_2 C_2`` has rank <= 2 r~ (see :func:`shared_fit_lower_bound`);
- ``shared``: ``W*_k = A* B* + A*_k B*_k`` with a rank-2 common part and rank-1 / rank-2
  personal parts (ranks 3 and 4 again, N(0, 1) factors), the structure the paper's Appendix J
  analysis assumes and the two-level model can represent exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pf2lora.adapters.linear import LinearLowRankModel, RegressionData, lora_name
from pf2lora.adapters.rank import effective_rank
from pf2lora.adapters.two_level import COMMON, PERSONAL
from pf2lora.algorithms.base import ClientAlgorithm, ServerAlgorithm
from pf2lora.algorithms.hetlora import HetLoRAClient, HetLoRAServer
from pf2lora.algorithms.pf2lora import PF2LoRAClient, PF2LoRAServer
from pf2lora.config import ConfigError, HetLoRAConfig, TrainConfig
from pf2lora.engines.local import LocalEngine
from pf2lora.utils import generator

TRUTHS = ("independent", "shared")


@dataclass
class SyntheticConfig:
    seed: int = 0
    truth: str = "shared"
    dim: int = 10
    examples: int = 1000
    train_examples: int = 700
    true_ranks: list[int] = field(default_factory=lambda: [3, 4])
    noise_std: list[float] = field(default_factory=lambda: [0.1, 0.2])
    steps: int = 10000  # the paper's 2000 reach ~20x the noise floor here (see the module docstring)
    interval: int = 10
    eval_every: int = 50  # steps between two recorded evaluations
    batch_size: int = 64
    rank: int = 4  # PF2LoRA r
    personal_rank: int = 2  # PF2LoRA r~
    lr: float = 0.005  # PF2LoRA upper level (AdamW)
    lower_lr: float = 0.002  # PF2LoRA lower level (SGD)
    het_lr: float = 0.002
    het_r_min: int = 1
    het_r_max: int = 12
    het_ranks: list[int] = field(default_factory=lambda: [2, 10])
    het_penalty: float = 0.1
    het_gamma: float = 0.7  # q = ceil(0.7 r_k): the last 30% of the rank is the tail
    hypergradient: str = "finite_difference"

    def validate(self) -> SyntheticConfig:
        if self.truth not in TRUTHS:
            raise ConfigError(f"unknown truth {self.truth!r} (choose from {', '.join(TRUTHS)})")
        if not 0 < self.train_examples < self.examples:
            raise ConfigError("train_examples must be between 0 and examples")
        if self.steps < self.interval or self.steps % self.interval or self.eval_every % self.interval:
            raise ConfigError(f"steps must be a positive multiple of the interval ({self.interval}), got {self.steps}")
        return self


def ground_truth(cfg: SyntheticConfig) -> list[torch.Tensor]:
    """``W*_k`` (n x m, the paper's orientation ``y = x W``) of each client."""
    g = generator(cfg.seed, "truth")

    def factor(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=g, dtype=torch.float64)

    n = cfg.dim
    if cfg.truth == "independent":
        return [factor(n, r) @ factor(r, n) for r in cfg.true_ranks]
    common_rank = min(cfg.true_ranks) - 1
    common = factor(n, common_rank) @ factor(common_rank, n)
    return [common + factor(n, r - common_rank) @ factor(r - common_rank, n) for r in cfg.true_ranks]


def make_data(cfg: SyntheticConfig, truths: list[torch.Tensor]) -> tuple[list[RegressionData], list[RegressionData]]:
    g = generator(cfg.seed, "data")
    train, test = [], []
    for w_star, std in zip(truths, cfg.noise_std, strict=True):
        x = torch.randn(cfg.examples, cfg.dim, generator=g, dtype=torch.float64)
        y = x @ w_star + std * torch.randn(cfg.examples, cfg.dim, generator=g, dtype=torch.float64)
        train.append(RegressionData(x[: cfg.train_examples], y[: cfg.train_examples]))
        test.append(RegressionData(x[cfg.train_examples :], y[cfg.train_examples :]))
    return train, test


def shared_fit_lower_bound(truths: list[torch.Tensor], personal_rank: int) -> float:
    """Least ``sum_k ||W_k - W*_k||_F^2`` of any shared part plus rank-r~ personal parts (2 clients)."""
    sigma = torch.linalg.svdvals(truths[0] - truths[1])
    return float(0.5 * (sigma[2 * personal_rank :] ** 2).sum())


def _normal(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def build_pf2lora(cfg: SyntheticConfig) -> tuple[ServerAlgorithm, ClientAlgorithm, LinearLowRankModel]:
    """Every factor N(0, 1); C_k's rows drawn in the orthogonal complement of A's row space."""
    g = generator(cfg.seed, "pf2lora-init")
    n, r = cfg.dim, cfg.rank
    basis, _ = torch.linalg.qr(_normal(g, n, n))  # orthonormal columns
    common = {
        lora_name(COMMON, "A"): _normal(g, r, r) @ basis[:, :r].T,  # rows in span(basis[:, :r])
        lora_name(COMMON, "B"): _normal(g, n, r),
    }
    complement = basis[:, r:]

    def personal(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            lora_name(PERSONAL, "A"): _normal(gen, cfg.personal_rank, complement.shape[1]) @ complement.T,
            lora_name(PERSONAL, "B"): _normal(gen, n, cfg.personal_rank),
        }

    model = LinearLowRankModel(common, personal)
    train = TrainConfig(
        local_steps=cfg.interval,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lower_lr=cfg.lower_lr,
        weight_decay=0.0,
        hypergradient=cfg.hypergradient,
    )
    return PF2LoRAServer(model.initial_common()), PF2LoRAClient(model, train, cfg.seed), model


def build_hetlora(cfg: SyntheticConfig) -> tuple[ServerAlgorithm, ClientAlgorithm, LinearLowRankModel]:
    """A ~ N(0, 1) (r_max x n), B = 0, as Appendix K; clients start at ranks (2, 10)."""
    g = generator(cfg.seed, "hetlora-init")
    common = {
        lora_name(COMMON, "A"): _normal(g, cfg.het_r_max, cfg.dim),
        lora_name(COMMON, "B"): torch.zeros(cfg.dim, cfg.het_r_max, dtype=torch.float64),
    }
    model = LinearLowRankModel(common)
    het = HetLoRAConfig(
        r_min=cfg.het_r_min, r_max=cfg.het_r_max, ranks=cfg.het_ranks, gamma=cfg.het_gamma, penalty=cfg.het_penalty
    )
    train = TrainConfig(local_steps=cfg.interval, batch_size=cfg.batch_size, lr=cfg.het_lr, weight_decay=0.0)
    server = HetLoRAServer(model.initial_common(), model.layout, list(cfg.het_ranks))
    return server, HetLoRAClient(model, train, het, cfg.seed), model


def run_method(name: str, cfg: SyntheticConfig, truths: list[torch.Tensor]) -> dict[str, Any]:
    """Train one method; record every client's losses, distance to W*_k and rank every round."""
    server, client, model = (build_pf2lora if name == "pf2lora" else build_hetlora)(cfg)
    train, test = make_data(cfg, truths)
    engine = LocalEngine(server, client, train, test)
    names = [f"client{k + 1}" for k in range(len(truths))]
    keys = ("train_loss", "test_loss", "frobenius", "rank")
    history: dict[str, dict[str, list[float]]] = {c: {k: [] for k in ("step", *keys)} for c in names}
    for server_round in range(1, cfg.steps // cfg.interval + 1):
        engine.train_round(server_round)
        if (server_round * cfg.interval) % cfg.eval_every and server_round * cfg.interval != cfg.steps:
            continue
        for cid, instruction in server.configure_evaluate(server_round, engine.client_ids).items():
            params = {**instruction.params, **engine.state(cid).get("personal", {})}
            w = model.delta(params).T  # the paper's W_k
            row = history[names[cid]]
            with torch.no_grad():
                row["train_loss"].append(model.loss(params, train[cid].batch(list(range(len(train[cid]))))).item())
                row["test_loss"].append(model.loss(params, test[cid].batch(list(range(len(test[cid]))))).item())
            row["frobenius"].append(float(torch.linalg.norm(w - truths[cid])))
            row["rank"].append(effective_rank(w))
            if isinstance(server, HetLoRAServer):
                row.setdefault("assigned_rank", []).append(server.ranks[cid])
            row["step"].append(server_round * cfg.interval)
    return {c: {"final": {k: h[k][-1] for k in keys}, "history": h} for c, h in history.items()}


def run_synthetic(cfg: SyntheticConfig) -> dict[str, Any]:
    """The experiment, at one torch thread whatever this process uses: on 10 x 10 matrices and
    batches of 64, OpenMP's threads cost far more than they save (500 steps: 5.3 s at one thread,
    139 s at two on a 2-core machine busy with other work)."""
    cfg.validate()
    truths = ground_truth(cfg)
    floors = [cfg.dim * s**2 for s in cfg.noise_std]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        methods = {name: run_method(name, cfg, truths) for name in ("pf2lora", "hetlora")}
    finally:
        torch.set_num_threads(threads)
    return {
        "config": asdict(cfg),
        "true_ranks": [int(torch.linalg.matrix_rank(w)) for w in truths],
        "noise_floor": {f"client{k + 1}": f for k, f in enumerate(floors)},
        "shared_fit_lower_bound": shared_fit_lower_bound(truths, cfg.personal_rank),
        "methods": methods,
    }
