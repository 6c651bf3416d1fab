"""pf2lora: personalized federated fine-tuning with two-level low-rank adapters.

PF2LoRA (arXiv 2503.03920) and its baselines on pretrained models, run in-process or on Flower.
From Python::

    import pf2lora

    cfg = pf2lora.load_config("configs/default.yaml", ["train.rounds=2"])
    results = pf2lora.run(cfg, "runs/mine")          # results.json, method by method
    pf2lora.methods.names()                          # every registered method
    pf2lora.register(pf2lora.Method(...))            # a method of your own (see the README)

The names below are imported on first use, so ``import pf2lora`` (and the CLI's bad-input checks)
stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_config": ("pf2lora.config", "load_config"),
    "ExperimentConfig": ("pf2lora.config", "ExperimentConfig"),
    "ConfigError": ("pf2lora.config", "ConfigError"),
    "run": ("pf2lora.api", "run"),
    "prepare": ("pf2lora.api", "prepare"),
    "Method": ("pf2lora.methods", "Method"),
    "register": ("pf2lora.methods", "register"),
    "compare": ("pf2lora.compare", None),
    "methods": ("pf2lora.methods", None),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pf2lora' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)
