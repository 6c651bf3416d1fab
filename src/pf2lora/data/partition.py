"""Split a labelled set across M clients; train and test are split by the same rule.

- ``heterogeneity`` h in [0, 1] (the paper's s): each client gets a fraction 1 - h drawn i.i.d.
  from the whole set and a fraction h from the data sorted by label, dealt in client order
  (h = 1: label-sorted shards; h = 0: i.i.d.). Applied to the test split with the same h so each
  client's test labels follow its own training distribution.
- ``key``: the natural partition: every value of a key column (a movie, a topic) belongs to one
  client, train and test alike; keys are dealt largest first to the client with fewest examples.
- ``dirichlet``: per label, client proportions ~ Dir(alpha); the same proportions split the test.
- ``iid``: h = 0.
- ``classes``: the pathological split of the pFedLoRA paper: each client holds k labels; the test
  split is divided by the same assignment.

Every function is deterministic in its seed and drops no example.
"""

from __future__ import annotations

import numpy as np

from pf2lora.config import ConfigError


def by_heterogeneity(labels: np.ndarray, num_clients: int, h: float, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    n_iid = int(round((1.0 - h) * len(labels)))
    iid, rest = order[:n_iid], order[n_iid:]
    rest = rest[np.argsort(labels[rest], kind="stable")]  # label-sorted, shuffled within a label
    iid_parts = np.array_split(iid, num_clients)
    sorted_parts = np.array_split(rest, num_clients)
    return [np.sort(np.concatenate([a, b])) for a, b in zip(iid_parts, sorted_parts, strict=True)]


def key_assignment(keys_train: np.ndarray, keys_test: np.ndarray, num_clients: int, seed: int) -> dict:
    """Map each key to a client: largest key first, to the client with the fewest examples so far."""
    values, counts = np.unique(np.concatenate([keys_train, keys_test]).astype(str), return_counts=True)
    if len(values) < num_clients:
        raise ConfigError(f"partition=key: {len(values)} distinct keys for {num_clients} clients")
    rng = np.random.default_rng(seed)
    tie = rng.permutation(len(values))  # seeded tie-break between keys of equal size
    load = np.zeros(num_clients, dtype=np.int64)
    owner = {}
    for i in sorted(range(len(values)), key=lambda i: (-counts[i], tie[i])):
        client = int(np.argmin(load))
        owner[values[i]] = client
        load[client] += counts[i]
    return owner


def by_key(keys: np.ndarray, owner: dict, num_clients: int) -> list[np.ndarray]:
    clients = np.array([owner[k] for k in keys.astype(str)], dtype=np.int64)
    return [np.flatnonzero(clients == c) for c in range(num_clients)]


def dirichlet_proportions(num_labels: int, num_clients: int, alpha: float, seed: int) -> np.ndarray:
    """(labels, clients) matrix; row c is the share of label c that each client gets."""
    return np.random.default_rng(seed).dirichlet([alpha] * num_clients, size=num_labels)


def by_proportions(labels: np.ndarray, proportions: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(proportions.shape[1])]
    for label in range(proportions.shape[0]):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = np.round(np.cumsum(proportions[label])[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64) for p in parts]


def class_assignment(num_labels: int, num_clients: int, k: int, seed: int) -> list[np.ndarray]:
    """The pathological non-IID split: client c holds k labels, dealt round-robin from a seeded
    label order (``order[(c k + j) mod C]``), so every label goes to about ``M k / C`` clients."""
    if not 1 <= k <= num_labels:
        raise ConfigError(f"data.classes_per_client must be in [1, {num_labels}] for {num_labels} labels, got {k}")
    order = np.random.default_rng(seed).permutation(num_labels)
    return [np.sort(order[[(c * k + j) % num_labels for j in range(k)]]) for c in range(num_clients)]


def by_classes(labels: np.ndarray, assignment: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Every example of a label is split evenly (seeded) between the clients holding that label; a
    label no client holds is left out (with M k >= C, e.g. 10 clients x 2 of 10 labels, none is)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in assignment]
    for label in np.unique(labels):
        holders = [c for c, held in enumerate(assignment) if label in held]
        if not holders:
            continue
        idx = rng.permutation(np.flatnonzero(labels == label))
        for client, chunk in zip(holders, np.array_split(idx, len(holders)), strict=True):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64) for p in parts]
