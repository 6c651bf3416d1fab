"""A low-precision frozen base (``model.dtype``): the pretrained weights of every linear layer kept
in bf16 (or fp16), everything trained in fp32.

Each frozen linear layer (``nn.Linear``, GPT-2's ``Conv1D``) stores its weight and bias once in the
low dtype and computes ``cast(x) @ W^T + b`` in that dtype, its output cast back to the dtype it
was loaded in. The rest of the model stays as loaded: embeddings, layer norms, attention (PyTorch's
CPU flash attention has a bf16 backward measured 4x slower than its fp32 one), the task's head,
the LoRA factors and their optimizer states. So the products with the frozen weights, about
half of an fp32 step here, run on the bf16 units (4.5x faster in the step), while the loss,
the gradients of the trained tensors and the residual stream stay fp32.

Why not ``model.to(bfloat16)``: attention's slow bf16 backward (1.13x a step, measured when this
was planned). bf16 autocast over the fp32 model was measured as fast per step as this (1.50x
against 1.53x in one ``make bench`` run, 1.11x in an earlier one), but it casts every weight again
at every call and the adapters' products with them, and PF2LoRA's functional passes would each need
an autocast region; here the weights are bf16 once, in half the memory.

A weight stored in bf16 loses its low bits once, at load. A finite difference of two gradients
at points 1e-3 apart drowns in bf16's rounding of every activation, so PF2LoRA's and Per-FedAvg's
finite-difference step defaults to one sized for the dtype (:data:`FD_RELATIVE`); the difference
itself, like the loss, is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from pf2lora.config import MODEL_DTYPES, ConfigError
from pf2lora.utils import l2_norm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert set(MODEL_DTYPES) == {"auto", *DTYPES}


def fast_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (faster than fp32): a CUDA GPU of
    compute capability 8.0 or newer (Ampere, Hopper, ...), or a CPU with AVX-512 BF16 or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        cpu = torch.cpu
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)
    return False


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype ``model.dtype`` names; ``auto`` is bf16 where :func:`fast_bf16`, else fp32."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(MODEL_DTYPES)}, not {name!r}")
    return DTYPES[name]


# PF2LoRA's and Per-FedAvg's finite-difference step (the norm of the perturbation) where
# train.fd_epsilon is None: 1e-3 with an fp32 base; with a low-precision one a share of the norm of
# the point it perturbs (at least 1), since bf16 rounds every activation to 3 significant digits and
# a perturbation must move them by more than that. Measured against the exact fp32 hypergradient
# (cosine) on the bundled encoder (||y|| = 2.8): fp32 at 1e-3 0.99999995; bf16 at 1e-3 0.985, at
# 1e-2 ||y|| 0.99996, at 2e-2 ||y|| 0.99985; fp16 at 1e-3 0.99855, at 1e-2 (3.5e-3 ||y||) 0.99998.
# On a tiny encoder at points with ||y|| = 5 and 16, bf16 at 1e-2 ||y||: 0.99996 and 0.99948,
# where a fixed 3e-2 gave 0.98815 at the second.
FD_EPSILON = 1e-3
FD_RELATIVE = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def fd_epsilon(configured: float | None, model: object, point: Mapping[str, Tensor]) -> float:
    """``train.fd_epsilon``, or where it is None the step for the dtype ``model`` computes in
    (``point``: the tensors the difference perturbs; their norm is taken only for a relative step)."""
    if configured is not None:
        return configured
    relative = FD_RELATIVE.get(getattr(model, "dtype", torch.float32))
    if relative is None:
        return FD_EPSILON
    return relative * max(l2_norm({k: t.detach() for k, t in point.items()}), 1.0)


class _Cast:
    """Mixed into a linear layer's class: computes in its weight's dtype; returns ``output_dtype``
    (the dtype it was loaded in, fp32), or the low dtype where ``output_dtype`` is None (the first half of an MLP,
    whose output only feeds an activation and the second half: see :data:`MLP_PAIRS`)."""

    output_dtype: torch.dtype | None

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x.to(self.weight.dtype))
        return out if self.output_dtype is None else out.to(self.output_dtype)


class CastLinear(_Cast, nn.Linear):
    """``nn.Linear`` whose weight is stored in a lower dtype than its input (PEFT still sees an
    ``nn.Linear`` and adapts it as usual)."""


_CAST_CLASSES: dict[type, type] = {nn.Linear: CastLinear}

# An MLP's first layer(s) and its second, by module name within a block: the first's output goes
# through the activation (and the gate's product) in the low dtype straight into the second, instead
# of out to fp32 and back (2 of the 4 largest casts of a step). PyTorch computes a bf16 activation
# in fp32 and rounds once, so the second layer's input is what it would be from fp32.
MLP_PAIRS = {
    "intermediate.dense": "output.dense",  # BERT, RoBERTa, DeBERTa, ELECTRA
    "gate_proj": "down_proj",  # Llama, Mistral, Qwen, SmolLM
    "up_proj": "down_proj",
    "c_fc": "c_proj",  # GPT-2
    "fc1": "fc2",  # OPT, Phi
}


def _cast_class(cls: type) -> type | None:
    if cls in _CAST_CLASSES:
        return _CAST_CLASSES[cls]
    from transformers.pytorch_utils import Conv1D

    if cls is Conv1D:
        cast = type("CastConv1D", (_Cast, Conv1D), {"__module__": __name__, "__qualname__": "CastConv1D"})
        globals()["CastConv1D"] = _CAST_CLASSES[cls] = cast  # importable by name, so it pickles
        return cast
    return None


def lower_precision(model: nn.Module, dtype: torch.dtype, keep: Iterable[str] = ()) -> int:
    """Store every linear layer's weight and bias in ``dtype`` (in place), except the modules named
    in ``keep`` and those below them (the task's head, which is trained) and PEFT's adapters
    (``lora_A``, ``lora_B``: their init is drawn in fp32 first, as without this). A weight shared with
    another module (a causal LM's output layer tied to its input embeddings) gets its own
    low-precision copy; the embeddings keep theirs. Returns the number of layers converted."""
    if dtype == torch.float32:
        return 0
    keep = tuple(keep)
    lowered: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(name == k or name.startswith(k + ".") for k in keep) or any(p.startswith("lora_") for p in parts):
            continue
        cls = _cast_class(type(module))
        if cls is None:
            continue
        stream = module.weight.dtype  # what the layer returns: the dtype it was loaded in
        for attr in ("weight", "bias"):
            tensor = getattr(module, attr, None)
            if tensor is not None:
                setattr(module, attr, nn.Parameter(tensor.detach().to(dtype), requires_grad=False))
        module.__class__ = cls
        module.output_dtype = stream
        lowered[name] = module
    for name, module in lowered.items():  # an MLP's first half feeds its second in the low dtype
        path = name.removesuffix(".base_layer")
        for first, second in MLP_PAIRS.items():
            if path == first or path.endswith("." + first):
                block = path[: len(path) - len(first)]
                if block + second in lowered or block + second + ".base_layer" in lowered:
                    module.output_dtype = None
    config = getattr(model, "config", None)
    if lowered and config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False  # transformers must not tie the fp32 embeddings back to it
    return len(lowered)
