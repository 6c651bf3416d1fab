"""A linear layer with two-level low-rank adapters and no base weight (PF2LoRA paper, Sec. 5).

``y = x dW^T`` with ``dW = s B A + s~ D_k C_k`` (A: r x n, B: m x r, C_k: r~ x n, D_k: m x r~),
so the paper's ``W_k = dW^T``. It has the interface of :class:`TwoLevelModel`, with the same
parameter names, so PF2LoRA and HETLoRA train it with exactly the code that trains transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from pf2lora.adapters.two_level import COMMON, PERSONAL, AdapterLayout, Batch, Params

MODULE = "linear"


def lora_name(level: str, factor: str) -> str:
    return f"{MODULE}.lora_{factor}.{level}.weight"


class LinearLowRankModel:
    """Multivariate linear regression through low-rank factors.

    The loss is the paper's squared norm ``||y - x W||^2`` per example, averaged over a batch
    (the minibatch form of ``||X W - Y||_F^2``), so client k's noise floor is ``m sigma_k^2``.
    """

    def __init__(
        self,
        common: Params,
        personal_init: Callable[[torch.Generator], Params] | None = None,
        scaling: float = 1.0,
        personal_scaling: float = 1.0,
    ) -> None:
        rank = common[lora_name(COMMON, "A")].shape[0]
        probe = personal_init(torch.Generator().manual_seed(0)) if personal_init else {}
        personal_rank = probe[lora_name(PERSONAL, "A")].shape[0] if probe else 0
        self.layout = AdapterLayout((MODULE,), rank, personal_rank, scaling, personal_scaling, (), "shared")
        self._common = {k: v.clone() for k, v in common.items()}
        self._personal_init = personal_init

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def train(self, mode: bool = True) -> None:  # no dropout, nothing to switch
        pass

    def twice_differentiable(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def initial_common(self) -> Params:
        return {k: v.clone() for k, v in self._common.items()}

    def initial_personal(self, generator: torch.Generator) -> Params:
        return self._personal_init(generator) if self._personal_init else {}

    def delta(self, params: Params) -> Tensor:
        """``dW`` (m x n) of these parameters."""
        lo = self.layout
        dw = lo.scaling * params[lora_name(COMMON, "B")] @ params[lora_name(COMMON, "A")]
        if lo.personal_rank and lora_name(PERSONAL, "A") in params:
            dw = dw + lo.personal_scaling * params[lora_name(PERSONAL, "B")] @ params[lora_name(PERSONAL, "A")]
        return dw

    def outputs(self, params: Params, batch: Batch) -> Tensor:
        return batch["inputs"] @ self.delta(params).T

    def loss(self, params: Params, batch: Batch, reduction: str = "mean") -> Tensor:
        per_example = ((self.outputs(params, batch) - batch["labels"]) ** 2).sum(dim=1)
        return per_example.sum() if reduction == "sum" else per_example.mean()

    @torch.no_grad()
    def evaluate(
        self, params: Params, data: RegressionData, batch_size: int, record: Path | None = None
    ) -> dict[str, float]:
        """The mean squared-error loss over ``data`` (the experiment's own metric is the rank)."""
        total = sum(
            self.loss(params, data.batch(list(range(i, min(i + batch_size, len(data))))), "sum").item()
            for i in range(0, len(data), batch_size)
        )
        return {"loss": total / len(data), "num_examples": len(data)}


class RegressionData:
    """Inputs X (N x n) and targets Y (N x m) of one client."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, indices: list[int], device: torch.device | None = None) -> dict[str, Tensor]:
        return {"inputs": self.inputs[indices], "labels": self.targets[indices]}
