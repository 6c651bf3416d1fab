"""Export a client's two-level adapter as one ordinary PEFT LoRA (PF2LoRA paper, Sec. 4).

``s B A + s~ D_k C_k = B' A'`` with ``B' = [s B | s~ D_k]`` (m x (r + r~)) and ``A' = [A ; C_k]``
((r + r~) x n), so client k's model is a LoRA of rank r + r~ with scaling 1
(``lora_alpha = r + r~``), plus its head as a module to save. ``PeftModel.from_pretrained(base,
dir)`` then reproduces client k's outputs with stock PEFT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from pf2lora.adapters.two_level import (
    COMMON,
    PERSONAL,
    AdapterLayout,
    Params,
    fan_in_fan_out,
    find_target_modules,
    resolve_targets,
)

_PREFIX = "base_model.model."


class PeftExporter:
    """Holds one PEFT model of rank r + r~ on a fresh base and writes clients' adapters with it."""

    def __init__(
        self, base: nn.Module, layout: AdapterLayout, target_modules: list[str], task_type: str | None = None
    ) -> None:
        """``task_type``: PEFT's (``CAUSAL_LM`` for generation), so that ``PeftModel.from_pretrained``
        gives the task's model class (its ``generate``)."""
        self.layout = layout
        rank = layout.rank + layout.personal_rank
        heads = sorted({n[len(_PREFIX) :].rsplit(".", 1)[0] for n in layout.head_names})
        targets = resolve_targets(base, target_modules)
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=targets,
            modules_to_save=heads or None,
            fan_in_fan_out=fan_in_fan_out(base, find_target_modules(base, targets)),
            task_type=task_type,
        )
        self.model = get_peft_model(base, config)
        self._params = dict(self.model.named_parameters())

    def merged(self, params: Params) -> Params:
        """The rank-(r + r~) factors ``A'``, ``B'`` of every module, and the head, under PEFT's names."""
        lo, out = self.layout, {}
        for m in lo.modules:
            a, b = params[f"{m}.lora_A.{COMMON}.weight"], lo.scaling * params[f"{m}.lora_B.{COMMON}.weight"]
            if a.shape[0] < lo.rank:  # a truncated (HETLoRA) client: zero-padding changes no output
                a = torch.cat([a, a.new_zeros(lo.rank - a.shape[0], a.shape[1])], 0)
                b = torch.cat([b, b.new_zeros(b.shape[0], lo.rank - b.shape[1])], 1)
            if lo.personal_rank:
                a = torch.cat([a, params[f"{m}.lora_A.{PERSONAL}.weight"]], dim=0)
                d = lo.personal_scaling * params[f"{m}.lora_B.{PERSONAL}.weight"]
                b = torch.cat([b, d], dim=1)
            out[f"{m}.lora_A.default.weight"], out[f"{m}.lora_B.default.weight"] = a, b
        for name in lo.head_names:
            module, leaf = name.rsplit(".", 1)
            out[f"{module}.modules_to_save.default.{leaf}"] = params[name]
        return out

    @torch.no_grad()
    def save(self, params: Params, folder: Path) -> None:
        for name, value in self.merged(params).items():
            self._params[name].copy_(value)
        self.model.save_pretrained(str(folder))
