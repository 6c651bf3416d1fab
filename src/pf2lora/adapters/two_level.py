"""Two-level LoRA on PEFT: ``W0 u + s B A u + s~ D_k C_k u`` (PF2LoRA, arXiv 2503.03920, Sec. 4).

Built on PEFT rather than a layer of our own, with one PEFT LoRA adapter per target module that
carries both levels: ``s B A + s~ D C = [s B | s~ D] [A ; C]``, so the adapter has rank r + r~ and
scaling 1, and its factors are assembled from the client's A, B, C, D inside autograd (each gets
its own gradient). Two PEFT adapters active at once compute the same sum, but the second branch
reads every layer's input again for a rank-r~ product; fusing them makes a PF2LoRA pass cost what
a HOMLoRA pass costs (measured in ``benchmarks/``). Without a personal level (HOMLoRA, HETLoRA)
the adapter is plain PEFT LoRA of rank r and scaling alpha / r.

The bilevel step needs the loss at several values of (x, y): y_t, y_{t+1}, y_t + eps v, and in
``exact`` mode y_{t+1} as a differentiable function of x. So the model is never trained through
its own ``nn.Parameter`` s: every parameter is frozen inside the module, and the tensors to use
are passed in by name with :func:`torch.func.functional_call`. One frozen copy of the base model
serves every client; a client's state is just its tensors, named
``<module>.lora_{A,B}.{common,personal}.weight`` and the head's own names.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from pf2lora.config import ConfigError
from pf2lora.precision import lower_precision, resolve_dtype
from pf2lora.tasks.base import Task, find_head

Params = dict[str, Tensor]
Batch = Mapping[str, Tensor]

COMMON, PERSONAL = "common", "personal"  # the two levels' names in a client's tensors


def base_delta_name(module: str) -> str:
    """The name of a dense change of ``module``'s frozen weight, (out, in) whatever the layer's
    storage (FedEx-LoRA folds its aggregation residual into the base weight through it)."""
    return f"{module}.base_delta"


@dataclass(frozen=True)
class AdapterLayout:
    """Which named tensors form the common part x and the personal part y of a client's model."""

    modules: tuple[str, ...]  # module paths of the adapted linear layers
    rank: int
    personal_rank: int  # 0: single-level (HOMLoRA)
    scaling: float  # s = lora_alpha / r
    personal_scaling: float  # s~ = personal_lora_alpha / r~
    head_names: tuple[str, ...]
    head: str  # "shared" (head in x) or "personal" (head in y)
    fan_in_fan_out: bool = False  # the adapted layers store their weight as (in, out) (GPT-2's Conv1D)

    def lora_names(self, level: str) -> list[str]:
        return [f"{m}.lora_{ab}.{level}.weight" for m in self.modules for ab in ("A", "B")]

    @property
    def x_names(self) -> list[str]:
        heads = list(self.head_names) if self.head == "shared" or not self.personal_rank else []
        return self.lora_names(COMMON) + heads

    @property
    def y_names(self) -> list[str]:
        if not self.personal_rank:
            return []
        heads = list(self.head_names) if self.head == "personal" else []
        return self.lora_names(PERSONAL) + heads


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """``targets`` as given, or for ``[auto]`` PEFT's default LoRA targets for the model's type
    (BERT and RoBERTa ``query``/``value``, DeBERTa-v2/v3 ``query_proj``/``value_proj``, ...), so
    one config serves the paper's model and the bundled one."""
    if list(targets) != ["auto"]:
        return list(targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in DEFAULTS:
        raise ConfigError(f"lora.target_modules=[auto]: PEFT has no default targets for model type {kind!r}; name them")
    return list(DEFAULTS[kind])


def _is_linear(module: nn.Module) -> bool:
    """A linear layer LoRA can adapt: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's
    ``c_attn``, a linear layer that stores its weight transposed)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def fan_in_fan_out(model: nn.Module, modules: list[str]) -> bool:
    """Whether the adapted layers store their weight as (in, out) (``Conv1D``), PEFT's flag for it."""
    from transformers.pytorch_utils import Conv1D

    found = dict(model.named_modules())
    return any(isinstance(found[m], Conv1D) for m in modules)


def find_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Paths of the linear modules (``nn.Linear`` or GPT-2's ``Conv1D``) whose last name component
    is one of ``targets`` (``[auto]``: see :func:`resolve_targets`)."""
    targets = resolve_targets(model, targets)
    found = {t: [] for t in targets}  # type: dict[str, list[str]]
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in found and _is_linear(module):
            found[leaf].append(name)
    missing = [t for t, names in found.items() if not names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"unknown target module(s) {', '.join(missing)} for this model (linear layers: {', '.join(linear)})"
        )
    return [n for t in targets for n in found[t]]


class TwoLevelModel:
    """A frozen PEFT model evaluated functionally at the (x, y) a client passes in.

    ``outputs``, ``loss`` and ``evaluate`` take a dict ``params`` holding every name in
    ``layout.x_names + layout.y_names``; nothing is read from or written to the module's own
    adapter parameters. The task (:mod:`pf2lora.tasks`) names the head and owns the loss and the
    evaluation; this class only evaluates the model at ``params``.
    """

    def __init__(
        self,
        base: nn.Module,
        task: Task,
        target_modules: list[str],
        rank: int,
        lora_alpha: float,
        personal_rank: int = 0,
        personal_lora_alpha: float = 1.0,
        head: str = "shared",
        dtype: str = "float32",
    ) -> None:
        target_modules = resolve_targets(base, target_modules)
        modules = find_target_modules(base, target_modules)  # clear error before PEFT's own
        head_names = find_head(base, task.head_candidates)
        self.task = task
        transposed = fan_in_fan_out(base, modules)
        if personal_rank:  # one fused adapter [A ; C], [s B | s~ D] of rank r + r~, scaling 1
            config = LoraConfig(
                r=rank + personal_rank,
                lora_alpha=rank + personal_rank,
                target_modules=target_modules,
                fan_in_fan_out=transposed,
            )
        else:
            config = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=target_modules, fan_in_fan_out=transposed)
        self.model = get_peft_model(base, config)
        prefix = "base_model.model."
        self.layout = AdapterLayout(
            modules=tuple(prefix + m for m in modules),
            rank=rank,
            personal_rank=personal_rank,
            scaling=lora_alpha / rank,
            personal_scaling=personal_lora_alpha / personal_rank if personal_rank else 0.0,
            head_names=tuple(prefix + n for n in head_names),
            head=head,
            fan_in_fan_out=transposed,
        )
        for p in self.model.parameters():
            p.requires_grad_(False)
        # the frozen linear layers in model.dtype, after PEFT drew the adapters' init in fp32
        heads = {prefix + n.split(".")[0] for n in head_names}
        self.dtype = resolve_dtype(dtype, self.device)  # what the frozen linear layers compute in
        lower_precision(self.model, self.dtype, keep=heads)
        named = dict(self.model.named_parameters())
        self._initial = {n: named[n].detach().clone() for n in self.layout.head_names}
        for m in self.layout.modules:  # PEFT's init: A Kaiming-uniform, B zero
            self._initial[f"{m}.lora_A.{COMMON}.weight"] = named[f"{m}.lora_A.default.weight"][:rank].detach().clone()
            self._initial[f"{m}.lora_B.{COMMON}.weight"] = (
                named[f"{m}.lora_B.default.weight"][:, :rank].detach().clone()
            )
            if personal_rank:
                a, b = named[f"{m}.lora_A.default.weight"], named[f"{m}.lora_B.default.weight"]
                self._initial[f"{m}.lora_A.{PERSONAL}.weight"] = a[rank:].detach().clone()
                self._initial[f"{m}.lora_B.{PERSONAL}.weight"] = b[:, rank:].detach().clone()

    def peft_params(self, params: Params) -> Params:
        """The PEFT module's tensors (``lora_A.default`` ...) assembled from a client's A, B, C, D;
        a module's ``base_delta`` (where given) added to its frozen weight."""
        lo = self.layout
        out = {n: params[n] for n in lo.head_names}
        for m in lo.modules:
            delta = params.get(base_delta_name(m))
            if delta is not None:
                frozen = self._frozen_weight(m)
                out[f"{m}.base_layer.weight"] = frozen + (delta.T if lo.fan_in_fan_out else delta).to(frozen.dtype)
            a, b = params[f"{m}.lora_A.{COMMON}.weight"], params[f"{m}.lora_B.{COMMON}.weight"]
            if lo.personal_rank:
                a = torch.cat([a, params[f"{m}.lora_A.{PERSONAL}.weight"]], 0)
                b = torch.cat([lo.scaling * b, lo.personal_scaling * params[f"{m}.lora_B.{PERSONAL}.weight"]], 1)
            out[f"{m}.lora_A.default.weight"], out[f"{m}.lora_B.default.weight"] = a, b
        return out

    def _frozen_weight(self, module: str) -> Tensor:
        return self.model.get_submodule(module).base_layer.weight

    def base_weight(self, module: str) -> Tensor:
        """``module``'s frozen pretrained weight, (out, in)."""
        w = self._frozen_weight(module).detach()
        return w.T if self.layout.fan_in_fan_out else w

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def initial_common(self) -> Params:
        """x at initialisation: A Kaiming-uniform, B zero (PEFT's default), the head as loaded."""
        return {n: self._initial[n].clone() for n in self.layout.x_names}

    def initial_personal(self, generator: torch.Generator) -> Params:
        """y_k at initialisation: C Kaiming-uniform from ``generator``, D zero, the head as loaded."""
        params: Params = {}
        for name in self.layout.y_names:
            ref = self._initial[name]
            if ".lora_A." in name:
                params[name] = kaiming_uniform(ref.shape, generator, ref.dtype).to(ref.device)
            elif ".lora_B." in name:
                params[name] = torch.zeros_like(ref)
            else:
                params[name] = ref.clone()
        return params

    @staticmethod
    def twice_differentiable() -> contextlib.AbstractContextManager:
        """Attention through the math kernel: fused/flash SDPA kernels have no double backward."""
        return sdpa_kernel([SDPBackend.MATH])

    def outputs(self, params: Params, batch: Batch) -> Any:
        """The model's output (logits, start/end logits, ...) at ``params`` for ``batch``."""
        return self._outputs_at(self.peft_params(params), batch)

    def _outputs_at(self, tensors: Params, batch: Batch) -> Any:
        """The module's output for ``batch`` with ``tensors`` (the module's own names) swapped in."""
        return functional_call(self.model, tensors, args=(), kwargs=self.task.model_inputs(batch), strict=False)

    def loss(self, params: Params, batch: Batch, reduction: str = "mean") -> Tensor:
        return self.task.loss(self.outputs(params, batch), batch, reduction)

    def representation(self, params: Params, batch: Batch) -> Tensor:
        """One vector per example: the last layer's hidden states at ``params``, averaged over the
        input's tokens (padding left out, and a causal LM's target tokens where ``labels`` marks
        them, so that a training pair and a test prompt are represented alike)."""
        inputs = {k: v for k, v in self.task.model_inputs(batch).items()}
        out = functional_call(
            self.model, self.peft_params(params), args=(), kwargs={**inputs, "output_hidden_states": True}, strict=False
        )
        hidden = out.hidden_states[-1].float()
        mask = inputs.get("attention_mask", torch.ones(hidden.shape[:2], device=hidden.device)).float()
        labels = batch.get("labels")
        if labels is not None and labels.shape == mask.shape:
            mask = mask * (labels < 0).float()  # the prompt only (targets are labelled, the rest ignored)
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    @contextlib.contextmanager
    def level_weights(self, weights: Tensor):
        """Within the block, example i's common level is weighted by ``weights[i, 0]`` and its
        personal level by ``weights[i, 1]`` (FedDPA's instance-wise mixing): the rank-(r + r~)
        inner product ``[A ; C] u`` of every adapted layer is scaled row by row. A batch ``k`` times
        as large (beam search) repeats each example's weights ``k`` times."""
        lo = self.layout
        split = lo.rank

        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            w = weights.to(output.dtype)
            if output.shape[0] != w.shape[0]:
                w = w.repeat_interleave(output.shape[0] // w.shape[0], dim=0)
            scale = torch.cat([w[:, :1].expand(-1, split), w[:, 1:].expand(-1, output.shape[-1] - split)], dim=1)
            return output * scale.view(scale.shape[0], *([1] * (output.dim() - 2)), -1)

        handles = [self.model.get_submodule(f"{m}.lora_A.default").register_forward_hook(hook) for m in lo.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def generate(self, params: Params, **kwargs: Any) -> Tensor:
        """``generate(**kwargs)`` of the underlying transformers model (beam search, the KV cache)
        with its adapters at ``params``: the module's tensors are swapped for the call only."""
        return self._generate_at(self.peft_params(params), **kwargs)

    def _generate_at(self, tensors: Params, **kwargs: Any) -> Tensor:
        """``generate(**kwargs)`` with ``tensors`` (the module's own names) swapped in for the call."""
        tensors = {f"model.{n}": t for n, t in tensors.items()}
        return functional_call(_Generate(self.model), tensors, args=(), kwargs=kwargs, strict=False)

    def merged_params(self, params: Params) -> Params:
        """The module's tensors with the client's adapters folded into the frozen weights
        (``W + s B A + s~ D C``, a ``base_delta`` included) and its head: the model at ``params``
        as a plain model computes it, with the adapters disabled."""
        lo, peft = self.layout, self.peft_params(params)
        out = {n: peft[n] for n in lo.head_names}
        scale = 1.0 if lo.personal_rank else lo.scaling  # the fused adapter carries s and s~ in B
        for m in lo.modules:
            weight = peft.get(f"{m}.base_layer.weight", self._frozen_weight(m))
            delta = scale * (peft[f"{m}.lora_B.default.weight"] @ peft[f"{m}.lora_A.default.weight"])
            out[f"{m}.base_layer.weight"] = weight + (delta.T if lo.fan_in_fan_out else delta).to(weight.dtype)
        return out

    def evaluate(self, params: Params, data: Any, batch_size: int, record: Path | None = None) -> dict[str, float]:
        """The task's metrics of the model at ``params`` on ``data`` (computed where the data is);
        ``record``: a file for the task's per-example outputs (e.g. generated text), if it keeps any.

        With a full-precision base the adapters are folded into the frozen weights once, so each
        forward pass (each generated token) runs the plain model, without the adapters' products;
        a bf16 weight would round most of a LoRA update away, so a low-precision base keeps them."""
        if self.dtype in (torch.float32, torch.float64):
            tensors, adapters = self.merged_params(params), self.model.disable_adapter()
        else:
            tensors, adapters = self.peft_params(params), contextlib.nullcontext()
        with adapters:
            model = ModelAt(partial(self._outputs_at, tensors), partial(self._generate_at, tensors))
            return self.task.evaluate(model, data, batch_size, self.device, record)


class _Generate(nn.Module):
    """``model.generate`` as a module's forward, so :func:`functional_call` can run it at given
    tensors (``generate`` calls the forward many times; every call sees the swapped tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> Tensor:
        return self.model.base_model.model.generate(**kwargs)


class ModelAt:
    """A client's model as a task sees it in ``evaluate``: called on a batch it gives the model's
    outputs; ``generate(**kwargs)`` is transformers' ``generate`` through the same adapters."""

    def __init__(self, forward: Any, generate: Any = None) -> None:
        self._forward, self._generate = forward, generate

    def __call__(self, batch: Batch) -> Any:
        return self._forward(batch)

    def generate(self, **kwargs: Any) -> Tensor:
        if self._generate is None:
            raise TypeError("this model cannot generate")
        return self._generate(**kwargs)


def kaiming_uniform(shape: torch.Size, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``nn.init.kaiming_uniform_(w, a=sqrt(5))`` (PEFT's and nn.Linear's init) from a generator."""
    fan_in = shape[1]
    gain = math.sqrt(2.0 / (1 + 5))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)
