"""Effective rank of a client's adapter update (PF2LoRA paper, Section 5).

``dW_k = s B A + s~ D_k C_k`` per target module; its effective rank is the smallest j whose top-j
singular values hold ``energy`` (90%) of their sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pf2lora.adapters.two_level import COMMON, PERSONAL, AdapterLayout, Params, base_delta_name


def effective_rank(matrix: Tensor, energy: float = 0.9) -> int:
    """Smallest j with ``sum(sigma[:j]) >= energy * sum(sigma)``; 0 for the zero matrix."""
    sigma = torch.linalg.svdvals(matrix.detach().double())
    total = sigma.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(sigma, 0)
    return int(torch.searchsorted(cumulative, energy * total - 1e-12 * total).item()) + 1


def delta_weights(layout: AdapterLayout, params: Params) -> dict[str, Tensor]:
    """``dW`` of every adapted module, from the common (and, if present, personal) adapters and a
    change folded into the frozen weight (FedEx-LoRA's residual), where there is one."""
    deltas = {}
    for module in layout.modules:
        delta = level_delta(layout, params, module, COMMON)
        if layout.personal_rank:
            delta = delta + level_delta(layout, params, module, PERSONAL)
        if base_delta_name(module) in params:
            delta = delta + params[base_delta_name(module)].double()
        deltas[module] = delta
    return deltas


def level_delta(layout: AdapterLayout, params: Params, module: str, level: str) -> Tensor:
    """One level's update of ``module`` in float64: ``s B A`` (common) or ``s~ D C`` (personal)."""
    a, b = params[f"{module}.lora_A.{level}.weight"], params[f"{module}.lora_B.{level}.weight"]
    scaling = layout.scaling if level == COMMON else layout.personal_scaling
    return scaling * (b.double() @ a.double())


def personal_to_common(layout: AdapterLayout, params: Params) -> float:
    """``sqrt(sum ||s~ D C||_F^2 / sum ||s B A||_F^2)`` over the adapted modules: how large the
    personal update is beside the common one (0 when the personal adapter has not moved; NaN when
    the common one has not either)."""
    common = sum(float(level_delta(layout, params, m, COMMON).norm() ** 2) for m in layout.modules)
    personal = sum(float(level_delta(layout, params, m, PERSONAL).norm() ** 2) for m in layout.modules)
    return (personal / common) ** 0.5 if common else float("nan")


def effective_ranks(layout: AdapterLayout, params: Params, energy: float = 0.9) -> dict[str, int]:
    """Effective rank per adapted module, keyed by a short module name."""
    return {short_module_name(m): effective_rank(dw, energy) for m, dw in delta_weights(layout, params).items()}


def short_module_name(path: str) -> str:
    """``base_model.model.bert.encoder.layer.3.attention.self.query`` -> ``layer.3.query``."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return f"{parts[i - 1]}.{part}.{parts[-1]}"
    return parts[-1]
