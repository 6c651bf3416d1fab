"""Data-to-text generation with a causal LM (the paper's E2E and WebNLG experiments, Section 6.2).

An input (an E2E meaning representation, WebNLG triples, a user's source text) is linearised into
a prompt ``<source>\\n`` followed by the target; the loss counts only the target tokens (and the
end-of-sequence token that stops generation). Evaluation runs on the client: the loss over its
(input, reference) pairs, then one beam search per input through the client's own two-level
adapter (transformers' ``generate`` with the KV cache, left-padded batches), scored against every
reference of that input with BLEU, NIST, METEOR, ROUGE-L, CIDEr and TER
(:mod:`pf2lora.tasks.text_metrics`). The generations stay on the client, written to the record
file the engine names (``generations/<method>/client<k>.jsonl``); only the metric values leave.

The model: any causal LM transformers loads (GPT-2, whose ``c_attn`` is a ``Conv1D``; Llama-style
models with ``q_proj`` / ``v_proj``; ``bundled-lm``, SmolLM2-135M-Instruct from its GGUF file).
There is no new head: the output layer stays frozen and only the adapters train.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from pf2lora.config import ConfigError, ExperimentConfig, TaskConfig
from pf2lora.data.generation import load_generation
from pf2lora.data.text import FederatedData, client_splits, lazy_clients
from pf2lora.tasks.base import Batch, Forward, Task, token_batches
from pf2lora.tasks.text_metrics import METRICS, score_all
from pf2lora.utils import write_jsonl

IGNORE = -100  # label of the tokens the loss skips (prompt, padding)


def prompt_text(source: str) -> str:
    """The prompt an input becomes; the target follows it."""
    return f"{source}\n"


class GenerationData:
    """One client's inputs (prompt token ids, references) and its training pairs: every
    (input, reference) as prompt + target + end-of-sequence ids, with the prompt length."""

    def __init__(
        self,
        inputs: pd.DataFrame,
        prompts: list[list[int]],
        ids: list[list[int]],
        prompt_lengths: np.ndarray,
        pair_input: np.ndarray,
        pad_id: int,
    ) -> None:
        self.inputs = inputs.reset_index(drop=True)  # source, references, key
        self.prompts, self.ids, self.pad_id = prompts, ids, pad_id
        self.prompt_lengths = np.asarray(prompt_lengths, dtype=np.int64)
        self.pair_input = np.asarray(pair_input, dtype=np.int64)  # pair -> row of ``inputs``

    def __len__(self) -> int:  # the training examples: (input, reference) pairs
        return len(self.ids)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @classmethod
    def pool(cls, parts: list[GenerationData]) -> GenerationData:
        """Every part's inputs and pairs, in order (centralized training)."""
        shift = np.cumsum([0] + [p.num_inputs for p in parts[:-1]])
        return cls(
            pd.concat([p.inputs for p in parts], ignore_index=True),
            [row for p in parts for row in p.prompts],
            [row for p in parts for row in p.ids],
            np.concatenate([p.prompt_lengths for p in parts]),
            np.concatenate([p.pair_input + s for p, s in zip(parts, shift, strict=True)]),
            parts[0].pad_id,
        )

    def batch(self, indices: list[int], device: torch.device | None = None) -> dict[str, Tensor]:
        """Pairs ``indices``, right-padded; ``labels`` are the ids with the prompt and padding masked."""
        length = max(len(self.ids[i]) for i in indices)
        input_ids = torch.full((len(indices), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        labels = torch.full((len(indices), length), IGNORE, dtype=torch.long)
        for row, i in enumerate(indices):
            ids = torch.as_tensor(self.ids[i])
            input_ids[row, : len(ids)], mask[row, : len(ids)] = ids, 1
            labels[row, self.prompt_lengths[i] : len(ids)] = ids[self.prompt_lengths[i] :]
        out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    def prompt_batch(self, rows: list[int], device: torch.device) -> dict[str, Tensor]:
        """Prompts of inputs ``rows``, left-padded (generation continues every row at its end)."""
        length = max(len(self.prompts[r]) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for row, r in enumerate(rows):
            n = len(self.prompts[r])
            input_ids[row, length - n :], mask[row, length - n :] = torch.as_tensor(self.prompts[r]), 1
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def encode(inputs: pd.DataFrame, tokenizer: Any, max_length: int) -> GenerationData:
    """Token ids of every input's prompt and of its (prompt, reference) pairs, at most
    ``max_length`` tokens per pair (a long reference is cut; a prompt that leaves no room for a
    target is an error)."""
    eos = tokenizer.eos_token_id
    prompts = prompt_ids(inputs["source"], tokenizer, max_length)
    references = [str(r) for refs in inputs["references"] for r in refs]
    targets = tokenizer(references, add_special_tokens=False)["input_ids"] if references else []
    ids, lengths, owner = [], [], []
    t = 0
    for row, refs in enumerate(inputs["references"]):
        for _ in refs:
            seq = (list(prompts[row]) + list(targets[t]))[: max_length - 1] + [eos]
            ids.append(seq)
            lengths.append(len(prompts[row]))
            owner.append(row)
            t += 1
    return GenerationData(
        inputs, [list(p) for p in prompts], ids, np.array(lengths), np.array(owner), pad_id(tokenizer)
    )


def prompt_ids(sources: Iterable[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """The token ids of each source's prompt; an error where a prompt leaves no room for a target
    in ``max_length`` tokens, or where the tokenizer has no end-of-sequence token."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("task.name=generation needs a tokenizer with an end-of-sequence token")
    prompts = tokenizer([prompt_text(s) for s in sources])["input_ids"]
    longest = max((len(p) for p in prompts), default=0)
    if longest >= max_length:
        raise ConfigError(
            f"model.max_length ({max_length}) is shorter than the longest prompt ({longest} tokens) plus a target; "
            f"raise it above {longest}"
        )
    return prompts


def pad_id(tokenizer: Any) -> int:
    """The padding id of the batches: the end-of-sequence id where the tokenizer has no padding
    token (GPT-2's)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_causal_lm(name: str) -> None:
    """Refuse a model that is not a decoder-only causal LM (an encoder such as the bundled
    all-MiniLM-L6-v2, or an encoder-decoder), before its weights are read."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from pf2lora.models import _explain, _folder, load_kwargs

    try:
        config = AutoConfig.from_pretrained(_folder(name), **load_kwargs(name))
    except Exception as err:
        raise _explain(name, err) from None
    architectures = list(getattr(config, "architectures", None) or [])
    decoder = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(
        config, "is_encoder_decoder", False
    )
    if architectures:
        decoder = decoder and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if not decoder:
        kind = f"{config.model_type}, {'/'.join(architectures)}" if architectures else config.model_type
        raise ConfigError(
            f"model {name!r} ({kind}) is not a causal language model; task.name=generation needs one "
            "(model.name=bundled-lm, gpt2-medium, a Llama-style model)"
        )


class Generation(Task):
    name = "generation"
    metrics = METRICS
    primary = "bleu"
    head_candidates = ()  # no task head: the LM's output layer stays frozen
    input_names = ("input_ids", "attention_mask")
    records = "generations"
    peft_task_type = "CAUSAL_LM"

    def __init__(self, cfg: TaskConfig, tokenizer: Any, pad_id: int) -> None:
        """``tokenizer``: decodes the generations on the client; ``pad_id``: the padding id of the
        batches (the end-of-sequence id where the tokenizer has no padding token, as GPT-2's)."""
        self.cfg, self.tokenizer, self.pad_id = cfg, tokenizer, pad_id
        self.eos_id = tokenizer.eos_token_id
        self.keeps_logits = False  # the model takes ``logits_to_keep`` (set by check_model)

    @classmethod
    def build(cls, cfg: ExperimentConfig, tokenizer: Any) -> tuple[Generation, FederatedData]:
        check_causal_lm(cfg.model.name)
        splits = load_generation(cfg.data, cfg.seed)
        # validation inputs held out whole: no input is in training with one reference, validation with another
        rows = client_splits(splits, cfg.data, cfg.seed, groups="source")
        for frame in (splits.train, splits.test):  # every prompt checked before any work
            prompt_ids(frame["source"], tokenizer, cfg.model.max_length)
        # each client's pairs are encoded when its data is first used (a site: its own inputs only)
        code = partial(encode, tokenizer=tokenizer, max_length=cfg.model.max_length)
        return cls(cfg.task, tokenizer, pad_id(tokenizer)), lazy_clients(splits, rows, code, splits.label_names)

    def load_model(self, name: str, dropout: float | None = None) -> nn.Module:
        from transformers import AutoModelForCausalLM

        from pf2lora.models import load_pretrained

        model = load_pretrained(AutoModelForCausalLM, name, dropout)  # build() checked it is a causal LM
        model.config.pad_token_id = self.pad_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = self.pad_id
        return model

    def check_model(self, model: nn.Module, tokenizer: Any) -> None:
        if not hasattr(model, "generate"):
            raise ConfigError(f"{type(model).__name__} cannot generate; task.name=generation needs a causal LM")
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        """The model's inputs; for a training batch (one with ``labels``) also ``logits_to_keep``:
        only the positions from the one before the batch's first target token onwards get logits.
        The prompt positions' logits predict nothing the loss counts, and a vocabulary-wide logit
        row per position is the largest tensor of a small causal LM's pass (4 x 64 tokens of
        SmolLM2: 50 MB, allocated afresh for the logits, their log-softmax and both gradients)."""
        inputs = super().model_inputs(batch)
        labels = batch.get("labels")
        if self.keeps_logits and labels is not None and labels.dim() == 2:
            counted = (labels != IGNORE).any(0).nonzero()
            first = int(counted[0]) if len(counted) else 1
            inputs["logits_to_keep"] = labels.shape[1] - max(first - 1, 0)
        return inputs

    def loss(self, outputs: Any, batch: Batch, reduction: str = "mean") -> Tensor:
        """Each pair's mean cross-entropy over its target tokens (next-token prediction), then
        the mean (or sum) over the pairs."""
        logits = outputs if isinstance(outputs, Tensor) else outputs.logits
        # the logits of the last positions only where the model kept those (``model_inputs``): the
        # logit at position t predicts the token at t + 1
        kept = logits.shape[1] - 1
        logits, labels = logits[:, :-1].float(), batch["labels"][:, batch["labels"].shape[1] - kept :]
        per_token = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
        ).view(labels.shape)
        counted = (labels != IGNORE).sum(1).clamp(min=1)
        per_pair = per_token.sum(1) / counted
        return per_pair.sum() if reduction == "sum" else per_pair.mean()

    def generate(self, forward: Forward, data: GenerationData, rows: list[int], device: torch.device) -> list[str]:
        """Beam search from the prompts of inputs ``rows``; the decoded new tokens of each."""
        batch = data.prompt_batch(rows, device)
        eos = self.eos_id
        out = forward.generate(
            **batch,
            num_beams=self.cfg.num_beams,
            max_new_tokens=self.cfg.max_new_tokens,
            length_penalty=self.cfg.length_penalty,
            no_repeat_ngram_size=self.cfg.no_repeat_ngram_size,
            early_stopping=True,
            do_sample=False,
            pad_token_id=data.pad_id,
            eos_token_id=eos,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        return [self._decode(row.tolist(), eos, data.pad_id) for row in new]

    def _decode(self, ids: list[int], eos: int, pad: int) -> str:
        """The text of generated ids up to the first end-of-sequence (padding dropped)."""
        if eos in ids:
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode([i for i in ids if i != pad], skip_special_tokens=True).strip()

    @torch.no_grad()
    def evaluate(
        self, forward: Forward, data: GenerationData, batch_size: int, device: torch.device, record: Path | None = None
    ) -> dict[str, float]:
        """The loss over the client's pairs, one beam search per input, every metric against all
        references; ``record``: the generations as JSON lines (input, prediction, references)."""
        total = 0.0
        for indices in token_batches([len(i) for i in data.ids], self.cfg.eval_tokens, max_items=batch_size):
            batch = data.batch(indices, device)
            total += self.loss(forward(batch), batch, reduction="sum").item()
        # beam search in batches of eval_tokens: every beam of an input holds its prompt and up to
        # max_new_tokens; inputs of like length together, so that the left padding stays short
        predictions: list[str] = [""] * data.num_inputs
        lengths = [len(p) for p in data.prompts]
        for rows in token_batches(lengths, self.cfg.eval_tokens, self.cfg.num_beams, self.cfg.max_new_tokens):
            for row, text in zip(rows, self.generate(forward, data, rows, device), strict=True):
                predictions[row] = text
        references = [list(map(str, r)) for r in data.inputs["references"]]
        scores = score_all(predictions, references)
        if record is not None:
            write_jsonl(
                record,
                [
                    {"input": s, "prediction": p, "references": r}
                    for s, p, r in zip(data.inputs["source"], predictions, references, strict=True)
                ],
            )
        return {**scores, "loss": total / max(len(data), 1), "num_examples": data.num_inputs}
