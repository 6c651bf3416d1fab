"""Tokenised per-client datasets for sequence classification, and the federated split of a dataset."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch

from pf2lora.config import ConfigError, DataConfig
from pf2lora.data import partition
from pf2lora.data.sources import TextSplits, load_splits
from pf2lora.utils import stable_seed


class TokenizedData:
    """Token ids of a set of examples; ``batch`` pads to the longest example in the batch."""

    def __init__(self, ids: list[list[int]], types: list[list[int]] | None, labels: np.ndarray, pad_id: int):
        self.ids, self.types, self.pad_id = ids, types, pad_id
        self.labels = torch.tensor(np.asarray(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: np.ndarray) -> TokenizedData:
        types = [self.types[i] for i in indices] if self.types is not None else None
        return TokenizedData([self.ids[i] for i in indices], types, self.labels[indices].numpy(), self.pad_id)

    @classmethod
    def pool(cls, parts: list[TokenizedData]) -> TokenizedData:
        """All examples of ``parts``, in order (centralized training on every client's data)."""
        if not parts:
            raise ValueError("nothing to pool")
        ids = [row for part in parts for row in part.ids]
        with_types = all(part.types is not None for part in parts)
        types = [row for part in parts for row in part.types] if with_types else None  # type: ignore[union-attr]
        labels = torch.cat([part.labels for part in parts]).numpy()
        return cls(ids, types, labels, parts[0].pad_id)

    def batch(self, indices: list[int], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        out = pad(self.ids, self.types, indices, self.pad_id)
        out["labels"] = self.labels[indices]
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


def pad(
    ids: list[list[int]], types: list[list[int]] | None, indices: list[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (and ``token_type_ids`` where there are types) of examples
    ``indices``, padded to the longest of them."""
    length = max(len(ids[i]) for i in indices)
    input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), length), dtype=torch.long)
    type_ids = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(ids[i])
        input_ids[row, :n] = torch.as_tensor(ids[i])
        mask[row, :n] = 1
        if types is not None:
            type_ids[row, :n] = torch.as_tensor(types[i])
    out = {"input_ids": input_ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = type_ids
    return out


def tokenize(frame, tokenizer, max_length: int) -> TokenizedData:
    pairs = frame["text_pair"].tolist() if "text_pair" in frame else None
    enc = tokenizer(frame["text"].tolist(), pairs, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids") if pairs is not None else None
    return TokenizedData(enc["input_ids"], types, frame["label"].to_numpy(), tokenizer.pad_token_id or 0)


@dataclass
class FederatedData:
    """Each client's own train and test split (any task's client data: each kind has ``batch``,
    ``__len__`` and a ``pool`` classmethod), the label names where the task has labels, and each
    client's validation split where ``data.validation_fraction`` holds one out of its training data."""

    train: Sequence[Any]
    test: Sequence[Any]
    label_names: list[str] = field(default_factory=list)
    validation: Sequence[Any] | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def evaluation(self, test: bool = True) -> EvalSets:
        """What each client is evaluated on: its test split (unless ``test`` is false) and its
        validation split where there is one."""
        splits = {"test": self.test} if test else {}
        if self.validation is not None:
            splits["validation"] = self.validation
        if not splits:
            raise ValueError("nothing to evaluate: no test split asked for and no validation split held out")
        return EvalSets(splits)

    def pooled_train(self) -> Any:
        """Every client's training examples in one set, in client order (centralized training)."""
        return type(self.train[0]).pool(list(self.train))


def client_indices(splits: TextSplits, cfg: DataConfig, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Partition train and test by ``cfg.partition``; checks that no client is left empty."""
    m = cfg.num_clients
    train_labels, test_labels = splits.train["label"].to_numpy(), splits.test["label"].to_numpy()
    if m > len(train_labels):
        raise ConfigError(
            f"data.num_clients ({m}) is larger than the number of training examples ({len(train_labels)})"
        )
    if m > len(test_labels):
        raise ConfigError(f"data.num_clients ({m}) is larger than the number of test examples ({len(test_labels)})")
    if cfg.partition in ("heterogeneity", "iid"):
        h = cfg.heterogeneity if cfg.partition == "heterogeneity" else 0.0
        train = partition.by_heterogeneity(train_labels, m, h, seed)
        test = partition.by_heterogeneity(test_labels, m, h, seed + 1)
    elif cfg.partition == "key":
        if "key" not in splits.train:
            raise ConfigError(f"partition=key needs data.key_column (dataset {cfg.dataset} has no key column)")
        owner = partition.key_assignment(splits.train["key"].to_numpy(), splits.test["key"].to_numpy(), m, seed)
        train = partition.by_key(splits.train["key"].to_numpy(), owner, m)
        test = partition.by_key(splits.test["key"].to_numpy(), owner, m)
    elif cfg.partition == "classes":
        assignment = partition.class_assignment(len(splits.label_names), m, cfg.classes_per_client, seed)
        train = partition.by_classes(train_labels, assignment, seed)
        test = partition.by_classes(test_labels, assignment, seed + 1)
    else:
        proportions = partition.dirichlet_proportions(len(splits.label_names), m, cfg.dirichlet_alpha, seed)
        train = partition.by_proportions(train_labels, proportions, seed)
        test = partition.by_proportions(test_labels, proportions, seed + 1)
    for client in range(m):
        if len(train[client]) == 0 or len(test[client]) == 0:
            which = "training" if len(train[client]) == 0 else "test"
            raise ConfigError(
                f"client {client} has no {which} examples under partition={cfg.partition}; "
                "use fewer clients or another partition"
            )
    return train, test


class EvalSets(Sequence):
    """Each client's evaluation data: ``sets[cid]`` maps a split's name (``test``, ``validation``)
    to the client's data of that split, each encoded when first asked for. An engine hands a
    client's mapping to :meth:`pf2lora.engines.local.Site.evaluate`, which reports the validation
    split's metrics under ``val_<metric>``."""

    def __init__(self, splits: dict[str, Sequence[Any]]) -> None:
        lengths = {len(split) for split in splits.values()}
        if len(lengths) != 1:
            raise ValueError(f"evaluation splits of different client counts: {sorted(lengths)}")
        self.splits = splits

    def __len__(self) -> int:
        return len(next(iter(self.splits.values())))

    def __getitem__(self, cid: int) -> dict[str, Any]:  # type: ignore[override]
        return {name: split[cid] for name, split in self.splits.items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[cid] for cid in range(len(self)))


def hold_out(
    train: list[np.ndarray], fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's training rows split into training and validation rows: a seeded ``fraction``
    of the client's own rows (so its validation data follows its own distribution), drawn apart
    from every other random choice of the run. ``groups``: a value per row of the whole split
    (a QA context, a generation input); rows of one group stay on one side, so that no validation
    example is a training example seen with another question or reference."""
    if fraction <= 0:
        return train, [np.array([], dtype=np.int64) for _ in train]
    rng = np.random.default_rng(stable_seed(seed, "validation"))
    kept, held = [], []
    for rows in train:
        if groups is None:
            order = rng.permutation(rows)
            n = int(round(fraction * len(rows)))
            kept.append(np.sort(order[n:]))
            held.append(np.sort(order[:n]))
            continue
        keys = groups[rows]
        unique = rng.permutation(np.unique(keys))
        n = int(round(fraction * len(unique)))
        chosen = np.isin(keys, unique[:n])
        kept.append(np.sort(rows[~chosen]))
        held.append(np.sort(rows[chosen]))
    return kept, held


def client_splits(
    splits: TextSplits, cfg: DataConfig, seed: int, groups: str | None = None
) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray]]:
    """Each client's training, validation (None without ``cfg.validation_fraction``) and test rows:
    :func:`client_indices`, then :func:`hold_out` of each client's training rows (``groups``: a
    column whose rows must stay together). A client left without training or validation rows is a
    ConfigError."""
    train, test = client_indices(splits, cfg, seed)
    if cfg.validation_fraction <= 0:
        return train, None, test
    values = splits.train[groups].astype(str).to_numpy() if groups is not None else None
    train, validation = hold_out(train, cfg.validation_fraction, seed, values)
    for client, (kept, held) in enumerate(zip(train, validation, strict=True)):
        if len(kept) == 0 or len(held) == 0:
            which = "training" if len(kept) == 0 else "validation"
            raise ConfigError(
                f"data.validation_fraction={cfg.validation_fraction:g} leaves client {client} without {which} "
                f"examples ({len(kept) + len(held)} in all); use a {'smaller' if len(kept) == 0 else 'larger'} "
                "fraction or fewer clients"
            )
    return train, validation, test


def lazy_clients(
    splits: TextSplits,
    rows: tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray]],
    encode: Callable[[pd.DataFrame], Any],
    label_names: list[str] | None = None,
) -> FederatedData:
    """Each client's training, test and (where held out) validation rows of ``splits`` (from
    :func:`client_splits`), encoded by ``encode`` when first used (:class:`LazyClients`); the
    validation rows are training rows."""
    train, validation, test = rows
    return FederatedData(
        LazyClients(splits.train, train, encode),
        LazyClients(splits.test, test, encode),
        label_names if label_names is not None else [],
        None if validation is None else LazyClients(splits.train, validation, encode),
    )


class LazyClients(Sequence):
    """Each client's examples of one split, encoded by ``encode`` (a frame of the client's rows in,
    the task's client data out) the first time the client's data is asked for, and kept. A deployed
    site asks only for its own partition and the Flower server for none, so neither encodes the
    whole federation's data (each did: 1.8 s of CPU on BBC News, in every process of a federation
    on one machine; SQuAD's windows take far longer). The same data as encoding the split at once
    and taking the client's rows: a tokenizer encodes each example on its own."""

    def __init__(self, frame: pd.DataFrame, indices: list[np.ndarray], encode: Callable[[pd.DataFrame], Any]) -> None:
        self.frame, self.indices, self.encode = frame, indices, encode
        self._done: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, cid: int) -> Any:  # type: ignore[override]
        if not isinstance(cid, int | np.integer):
            raise TypeError(f"client ids are integers, not {type(cid).__name__}")
        if not -len(self) <= cid < len(self):
            raise IndexError(f"client {cid} of {len(self)}")
        cid = int(cid) % len(self)
        if cid not in self._done:
            self._done[cid] = self.encode(self.frame.iloc[self.indices[cid]])
        return self._done[cid]

    def __iter__(self) -> Iterator[Any]:
        return (self[cid] for cid in range(len(self)))


def build_federated_data(cfg: DataConfig, tokenizer, max_length: int, seed: int) -> FederatedData:
    """Each client's splits, tokenized as they are first used (:class:`LazyClients`)."""
    splits = load_splits(cfg, seed)
    encode = partial(tokenize, tokenizer=tokenizer, max_length=max_length)
    return lazy_clients(splits, client_splits(splits, cfg, seed), encode, splits.label_names)
