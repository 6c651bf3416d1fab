"""How far one machine scales: the in-process engine with N simulated PF2LoRA clients.

One fresh process per N: every client trains once (one round, ``fraction`` of the clients per
round until all have state), on the bundled model; reported are the seconds per round, the
resident memory with every client's state held (in memory, or on disk when asked), and the
memory each additional client costs next to the size of its state (personal adapter, AdamW
moments, sampler cursor).

    python -m benchmarks.scale 1000 [memory|disk]
    python -m benchmarks.scale 10000 disk 0.01 3     # 10,000 clients, 1% per round, 3 timed rounds
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.memory import _status, peak


def trim() -> None:
    """Hand freed heap back to the OS, so RSS counts live memory only (as the engine does)."""
    import gc

    from pf2lora.utils import release_free_memory

    gc.collect()
    release_free_memory()


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in a client's state."""
    import torch

    total = 0
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def measure(clients: int, where: str = "memory", fraction: float = 1.0) -> dict[str, float]:
    from pf2lora.config import load_config
    from pf2lora.engines.local import LocalEngine
    from pf2lora.methods import build_algorithm
    from pf2lora.runner import prepare

    cfg = load_config(
        "configs/default.yaml",
        [
            f"data.num_clients={clients}",
            "data.dataset=rotten_tomatoes",  # 12,808 snippets: enough for 1,000 clients' test splits
            "data.partition=iid",
            f"data.max_examples={8 * clients}",
            f"data.max_test_examples={2 * clients}",
            "model.max_length=32",
            "train.local_steps=1",
            "train.batch_size=2",
            f"train.client_fraction={fraction}",
            "train.threads=2",
            "train.workers=1",  # in this process, at 2 torch threads
        ],
    )
    prepared = prepare(cfg)
    server, client, _ = build_algorithm("pf2lora", cfg, prepared.base_model(), prepared.task)
    folder = tempfile.mkdtemp() if where == "disk" else None
    engine = LocalEngine(
        server, client, prepared.data.train, prepared.data.test, state_dir=Path(folder) if folder else None
    )
    # the first tenth of the clients, then the rest: the marginal memory of a held client
    first = max(1, clients // 10)
    for cid in range(first):
        engine.state(cid)
        instruction = server.configure_train(0, [cid])[cid]
        _, engine.states[cid] = client.train(cid, instruction, engine.state(cid), prepared.data.train[cid])
    trim()
    rss_first = _status("VmRSS")
    rounds, started = 0, time.perf_counter()
    while rounds == 0 or len(engine.states) < clients:
        rounds += 1
        engine.train_round(rounds)
    seconds = (time.perf_counter() - started) / rounds
    trim()
    rss_after = _status("VmRSS")
    one_state = state_bytes(engine.states[0])
    return {
        "clients": clients,
        "client_state": where,
        "clients_per_round": len(server.configure_train(rounds + 1, engine.client_ids)),
        "seconds_per_round": seconds,
        "rss_bytes": rss_after,
        "peak_rss_bytes": peak(),
        "memory_per_client_bytes": (rss_after - rss_first) / (clients - first),
        "state_bytes_per_client": one_state,
    }


def sampled(clients: int, fraction: float, rounds: int) -> dict[str, float]:
    """``clients`` simulated PF2LoRA clients with their states on disk, ``fraction`` of them trained
    per round for ``rounds`` rounds: seconds per round and the process's resident memory (peak and
    at the end). The clients split Rotten Tomatoes' 10,246 training snippets i.i.d. (one or two
    each: the bundled corpus with the most examples); no client is evaluated, so none needs a test
    split (the partitioner's check that every client has one is for runs that evaluate)."""
    import numpy as np

    from pf2lora.config import load_config
    from pf2lora.data import partition
    from pf2lora.data.sources import load_splits
    from pf2lora.data.text import tokenize
    from pf2lora.engines.local import LocalEngine
    from pf2lora.methods import build_algorithm
    from pf2lora.models import load_tokenizer
    from pf2lora.runner import prepare

    overrides = [
        "data.dataset=rotten_tomatoes",
        "data.partition=iid",
        "model.max_length=32",
        "train.local_steps=1",
        "train.batch_size=2",
        f"train.client_fraction={fraction}",
        "train.threads=2",
        "train.workers=1",
    ]
    cfg = load_config("configs/default.yaml", overrides)  # its own 4 clients: checks model and data
    prepared = prepare(cfg)
    splits = load_splits(cfg.data, cfg.seed)
    owners = partition.by_heterogeneity(splits.train["label"].to_numpy(), clients, 0.0, cfg.seed)
    if min(len(o) for o in owners) == 0:
        raise SystemExit(f"{clients} clients: more than the {len(splits.train)} training examples")
    every = tokenize(splits.train, load_tokenizer(cfg.model.name), cfg.model.max_length)
    train = [every.subset(np.asarray(o)) for o in owners]
    cfg.data.num_clients = clients
    server, client, _ = build_algorithm("pf2lora", cfg, prepared.base_model(), prepared.task)
    with tempfile.TemporaryDirectory() as folder:
        engine = LocalEngine(server, client, train, [prepared.data.test[0]] * clients, state_dir=Path(folder))
        engine.train_round(1)  # the first round's allocations
        trim()
        started = time.perf_counter()
        for r in range(2, rounds + 2):
            engine.train_round(r)
        seconds = (time.perf_counter() - started) / rounds
        trim()
        on_disk = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
        return {
            "clients": clients,
            "client_state": "disk",
            "clients_per_round": len(server.configure_train(rounds + 2, engine.client_ids)),
            "rounds": rounds + 1,
            "clients_with_state": len(engine.states),
            "state_bytes_on_disk": on_disk,
            "seconds_per_round": seconds,
            "rss_bytes": _status("VmRSS"),
            "peak_rss_bytes": peak(),
        }


if __name__ == "__main__":
    if len(sys.argv) > 3:  # N disk FRACTION ROUNDS
        print(json.dumps(sampled(int(sys.argv[1]), float(sys.argv[3]), int(sys.argv[4]))))
    else:
        where = sys.argv[2] if len(sys.argv) > 2 else "memory"
        print(json.dumps(measure(int(sys.argv[1]), where)))
