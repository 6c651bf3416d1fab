"""The in-process engine: M simulated clients on one machine, one frozen base model.

The engine moves parameters between the server and client algorithm objects and keeps each
client's state (personal adapter, optimizer moments, sampler cursor) in a dict; the algorithms
never know they run in one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from pf2lora.algorithms.base import (
    ClientAlgorithm,
    ClientData,
    ClientState,
    Instruction,
    ServerAlgorithm,
    TrainResult,
)
from pf2lora.codec import transmit
from pf2lora.engines.states import DiskStates, PackedStates
from pf2lora.metrics import classification_metrics
from pf2lora.utils import numel, release_free_memory

log = logging.getLogger(__name__)
Record = dict[str, Any]


class LocalEngine:
    def __init__(
        self,
        server: ServerAlgorithm,
        client: ClientAlgorithm,
        train: Sequence[ClientData],
        test: Sequence[ClientData],
        on_step: Callable[[], None] | None = None,
        state_dir: Path | None = None,
        compression: str = "none",
    ) -> None:
        """``train`` and ``test``: each client's splits. A method that trains on pooled data (centralized)
        passes one training set and is still evaluated on every test split. ``state_dir``: keep client
        states on disk there instead of in memory. ``compression``: none | fp16 | bf16, the dtype of
        what travels each way."""
        self.compression = compression
        self.server, self.client = server, client
        self.train_data, self.test_data = train, test
        self.states: MutableMapping[int, ClientState] = DiskStates(state_dir) if state_dir else PackedStates()
        self.on_step = on_step or (lambda: None)

    @property
    def client_ids(self) -> list[int]:
        """The clients that are evaluated (each has a test split)."""
        return list(range(len(self.test_data)))

    @property
    def train_ids(self) -> list[int]:
        return list(range(len(self.train_data)))

    def state(self, cid: int) -> ClientState:
        if cid not in self.states:
            state = self.client.init_state(cid)
            self.states[cid] = state  # stored as a copy (packed, or on disk)
            return state
        return self.states[cid]

    def train_round(self, server_round: int) -> Record:
        """One communication round: local training on the sampled clients, then aggregation."""
        instructions = self.server.configure_train(server_round, self.train_ids)
        results, clients = {}, {}
        for cid, instruction in instructions.items():
            params, down = transmit(instruction.params, self.compression)
            result, self.states[cid] = self.client.train(
                cid, Instruction(params, instruction.config), self.state(cid), self.train_data[cid]
            )
            params, up = transmit(result.params, self.compression)
            results[cid] = TrainResult(params, result.num_examples, result.metrics)
            clients[cid] = {
                **result.metrics,
                "bytes_received": down,
                "bytes_sent": up,
                "parameters_received": numel(instruction.params),
                "parameters_sent": numel(result.params),
            }
            self.on_step()
        self.server.aggregate_train(server_round, results)
        del results
        release_free_memory()
        return {"round": server_round, "clients": clients}

    def evaluate(self, server_round: int) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, int]]]:
        """Every client on its own test split; its effective rank per adapted module."""
        metrics, ranks = {}, {}
        for cid, instruction in self.server.configure_evaluate(server_round, self.client_ids).items():
            state = self.state(cid)
            instruction = self.client_view(cid, instruction, state)
            prediction = self.client.predict(cid, instruction, state, self.test_data[cid])
            metrics[cid] = classification_metrics(prediction)
            ranks[cid] = self.client.effective_ranks(instruction, state)
        return metrics, ranks

    def client_view(self, cid: int, instruction: Instruction, state: ClientState | None = None) -> Instruction:
        """What client ``cid`` evaluates: the server's evaluation instruction as it arrives, adapted
        by the method to the client's own training data where it does that (Per-FedAvg)."""
        instruction = Instruction(transmit(instruction.params, self.compression)[0], instruction.config)
        own_train = self.train_data[cid] if len(self.train_data) == len(self.test_data) else None
        return self.client.personalize(cid, instruction, self.state(cid) if state is None else state, own_train)

    def run(
        self, rounds: int, eval_every: int = 0, on_round: Callable[[Record], None] | None = None
    ) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, int]]]:
        """Train ``rounds`` rounds; evaluate every ``eval_every`` and after the last. Returns the final
        per-client metrics and effective ranks."""
        final: tuple[dict[int, dict[str, float]], dict[int, dict[str, int]]] = ({}, {})
        for server_round in range(1, rounds + 1):
            record = self.train_round(server_round)
            if server_round == rounds or (eval_every and server_round % eval_every == 0):
                final = self.evaluate(server_round)
                record["eval"], record["effective_rank"] = final
            log.debug("round %d done", server_round)
            if on_round is not None:
                on_round(record)
        return final
