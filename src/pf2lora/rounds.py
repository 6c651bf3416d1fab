"""The round loop every engine runs, and the checkpoint it leaves after every round.

A run can be killed at any moment and continued (``pf2lora run --resume``). After each round the
loop writes one file, ``resume/<method>/round.pt``, whole and then renamed in: the round, the
server's state (:meth:`~pf2lora.algorithms.base.ServerAlgorithm.state`), what the engine keeps
besides (the Flower engine: each client's personal size), the last evaluation, the RNG states and
how far ``metrics.jsonl`` had got. Client states are not in it: every engine writes them to disk
as they change, one file per client and round (:class:`~pf2lora.engines.states.DiskStates`), and
keeps the two latest, so the versions as of the checkpoint's round are there whatever round the
crash hit. Batches, dropout and client sampling are seeded by round and client, so a round run
again from its checkpoint computes what it computed the first time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pf2lora.utils import atomic_write

Record = dict[str, Any]
Evaluation = tuple[dict[int, dict[str, float]], dict[int, dict[str, int]]]


class Checkpoint:
    """Method ``name``'s resume point in run directory ``out``; ``position``: where ``metrics.jsonl``
    stands (its byte offset), read as each round's checkpoint is written."""

    def __init__(self, out: Path, name: str, position: Callable[[], int] = lambda: 0) -> None:
        self.folder, self.position = out / "resume" / name, position
        self.path = self.folder / "round.pt"

    def save(self, server_round: int, engine: dict[str, Any], final: Evaluation) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        content = {
            "round": server_round,
            "engine": engine,
            "final": final,
            "metrics_bytes": self.position(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        atomic_write(self.path, lambda tmp: torch.save(content, tmp))

    def load(self) -> dict[str, Any] | None:
        """The last complete round's checkpoint (None: no round completed), RNG states restored."""
        if not self.path.is_file():
            return None
        content = torch.load(self.path, weights_only=False)
        torch.set_rng_state(content["rng"]["torch"])
        np.random.set_state(content["rng"]["numpy"])
        random.setstate(content["rng"]["python"])
        return content

    def metrics_bytes(self) -> int | None:
        """How far ``metrics.jsonl`` stood at the last complete round (None: no round completed)."""
        if not self.path.is_file():
            return None
        # mapped, not read: the engine's tensors (server parameters, in Flower's case every client's
        # state) stay on disk; only the small Python values are unpickled
        return int(torch.load(self.path, weights_only=False, mmap=True)["metrics_bytes"])

    def clear(self) -> None:
        """The method finished: its resume point is no longer needed."""
        self.path.unlink(missing_ok=True)


class RoundEngine(Protocol):
    """What the round loop needs of an engine."""

    def train_round(self, server_round: int) -> Record: ...

    def evaluate_round(self, server_round: int, final: bool) -> tuple[Evaluation, Record]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def restore(self, saved: dict[str, Any], last_round: int) -> None: ...


def run_rounds(
    engine: RoundEngine,
    rounds: int,
    eval_every: int,
    on_round: Callable[[Record], None] | None,
    checkpoint: Checkpoint | None = None,
) -> Evaluation:
    """Train ``rounds`` rounds; evaluate every ``eval_every`` and after the last (``rounds`` = 0:
    evaluate the initial model only). With a ``checkpoint``: go on from its last complete round,
    and leave one after each round. Returns the final per-client metrics and effective ranks."""
    final: Evaluation = ({}, {})
    on_round = on_round or (lambda record: None)
    saved = checkpoint.load() if checkpoint is not None else None
    start = 1
    if saved is not None:
        engine.restore(saved["engine"], saved["round"])
        start, final = saved["round"] + 1, saved["final"]
    elif checkpoint is not None:
        engine.restore({}, 0)  # nothing complete: client states of a crashed first round forgotten
    if rounds == 0:  # the untrained model: evaluated as the server starts (round 0)
        final, extra = engine.evaluate_round(0, final=True)
        on_round({"round": 0, "clients": {}, "eval": final[0], "effective_rank": final[1], **extra})
    for server_round in range(start, rounds + 1):
        record = engine.train_round(server_round)
        if server_round == rounds or (eval_every and server_round % eval_every == 0):
            final, extra = engine.evaluate_round(server_round, final=server_round == rounds)
            record["eval"], record["effective_rank"] = final
            record.update(extra)
        on_round(record)
        if checkpoint is not None:
            checkpoint.save(server_round, engine.snapshot(), final)
    return final
