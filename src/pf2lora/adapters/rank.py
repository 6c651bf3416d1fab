"""Effective rank of a client's adapter update (PF2LoRA paper, Section 5).

``dW_k = s B A + s~ D_k C_k`` per target module; its effective rank is the smallest j whose top-j
singular values hold ``energy`` (90%) of their sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pf2lora.adapters.two_level import COMMON, PERSONAL, AdapterLayout, Params


def effective_rank(matrix: Tensor, energy: float = 0.9) -> int:
    """Smallest j with ``sum(sigma[:j]) >= energy * sum(sigma)``; 0 for the zero matrix."""
    sigma = torch.linalg.svdvals(matrix.detach().double())
    total = sigma.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(sigma, 0)
    return int(torch.searchsorted(cumulative, energy * total - 1e-12 * total).item()) + 1


def delta_weights(layout: AdapterLayout, params: Params) -> dict[str, Tensor]:
    """``dW`` of every adapted module, from the common (and, if present, personal) adapters."""
    deltas = {}
    for module in layout.modules:
        a, b = params[f"{module}.lora_A.{COMMON}.weight"], params[f"{module}.lora_B.{COMMON}.weight"]
        delta = layout.scaling * (b.double() @ a.double())
        if layout.personal_rank:
            c = params[f"{module}.lora_A.{PERSONAL}.weight"]
            d = params[f"{module}.lora_B.{PERSONAL}.weight"]
            delta = delta + layout.personal_scaling * (d.double() @ c.double())
        deltas[module] = delta
    return deltas


def personal_to_common(layout: AdapterLayout, params: Params) -> float:
    """``sqrt(sum ||s~ D C||_F^2 / sum ||s B A||_F^2)`` over the adapted modules: how large the
    personal update is beside the common one (0 when the personal adapter has not moved; NaN when
    the common one has not either)."""
    personal = common = 0.0
    for module in layout.modules:
        a, b = params[f"{module}.lora_A.{COMMON}.weight"], params[f"{module}.lora_B.{COMMON}.weight"]
        c, d = params[f"{module}.lora_A.{PERSONAL}.weight"], params[f"{module}.lora_B.{PERSONAL}.weight"]
        common += float((layout.scaling * (b.double() @ a.double())).norm() ** 2)
        personal += float((layout.personal_scaling * (d.double() @ c.double())).norm() ** 2)
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
