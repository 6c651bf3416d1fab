"""Secure aggregation of a round's training on a Flower federation: Flower's SecAgg+ as it ships.

Flower 1.41 implements SecAgg+ (Bell et al., CCS 2020) for its legacy strategy API only: the
server's ``SecAggPlusWorkflow`` drives four stages of ``train`` messages (setup, key sharing,
masked vectors, unmasking) and calls a legacy ``Strategy`` (``configure_fit`` / ``aggregate_fit``);
each client's ``secaggplus_mod`` masks the reply of its ClientApp, which it reads in the legacy
``FitRes`` form. This module fits our server algorithm under that API for one round:
:class:`RoundStrategy` hands the workflow the algorithm's instructions as ``FitIns`` and takes back
the unmasked mean, which the algorithm aggregates as the round's one reply; the ClientApp answers
a ``FitIns`` with a ``FitRes`` (:func:`to_instruction`, :func:`to_fitres`).

What this gives and costs:

- the server sees only the mean of the sampled clients' parameters, never one client's;
- so it cannot check an update (``train.update_norm_bound``, the structure checks) nor clip one
  (DP-FedAvg): methods whose server averages (``Method.averages``), uniform weights, no ``dp``;
- values are clipped to [-8, 8] and quantised to 2^22 levels over that range (Flower's defaults):
  a mean differs from the plain one by about 1e-6 per value;
- four exchanges a round instead of one (Flower's workflow polls every 3 s);
- every sampled client must answer the masked-vector stage unless two thirds of the key shares
  survive (``reconstruction_threshold``); a client that drops after it is recovered from its shares.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from pf2lora.algorithms.base import Instruction, Params, TrainResult

NAMES = "pf2lora.names"  # a FitIns's config: the names of its arrays, in order (legacy arrays have none)
SHARES = 1.0  # every sampled client holds a share of every other's keys
THRESHOLD = 2 / 3  # shares that reconstruct a key


def _arrays(params: Params, names: list[str]) -> Parameters:
    return ndarrays_to_parameters([params[k].detach().cpu().float().numpy() for k in names])


class RoundStrategy(Strategy):
    """One round of a server algorithm as the legacy Strategy SecAggPlusWorkflow drives."""

    def __init__(
        self, instructions: dict[int, Instruction], nodes: dict[int, int], grid: Grid | AuditedGrid, method: str
    ) -> None:
        self.instructions, self.nodes, self.grid, self.method = instructions, nodes, grid, method
        self.results: list[tuple[Any, FitRes]] = []
        self.failures: list[Any] = []
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[Any, FitIns]]:
        fits = []
        for cid, instruction in self.instructions.items():
            names = sorted(instruction.params)
            config = {**instruction.config, "server_round": server_round, "method": self.method, NAMES: ",".join(names)}
            proxy = GridClientProxy(self.nodes[cid], self.grid, self.grid.run.run_id)
            fits.append((proxy, FitIns(_arrays(instruction.params, names), config)))
        return fits

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        """The workflow hands every result the unmasked mean as its parameters."""
        self.results, self.failures = results, failures
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    # the workflow drives training only; evaluation stays with the engine
    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        return None


class AuditedGrid:
    """``grid`` as the workflow uses it, telling ``seen`` of every message sent and every reply."""

    def __init__(self, grid: Grid, seen: Any) -> None:
        self.grid, self.seen = grid, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        messages = list(messages)
        for message in messages:
            self.seen(message, sent=True)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            self.seen(reply, sent=False)
        return replies


def secure_round(
    grid: Grid | AuditedGrid,
    nodes: dict[int, int],
    method: str,
    server_round: int,
    instructions: dict[int, Instruction],
    timeout: float,
) -> tuple[TrainResult | None, dict[int, dict[str, float]], int]:
    """Run SecAgg+ over ``instructions``: the unmasked mean as one reply (None: the protocol stopped,
    e.g. fewer than two clients), each answering client's training metrics, and how many dropped."""
    strategy = RoundStrategy(instructions, nodes, grid, method)
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    SecAggPlusWorkflow(SHARES, THRESHOLD, max_weight=1.0, timeout=timeout)(grid, context)
    clients_of = {node: cid for cid, node in nodes.items()}
    metrics = {clients_of[proxy.node_id]: dict(fitres.metrics) for proxy, fitres in strategy.results}
    if strategy.mean is None:
        return None, metrics, len(strategy.failures)
    sent = next(iter(instructions.values())).params
    names = sorted(sent)
    mean = {k: torch.from_numpy(np.array(a)).to(sent[k].dtype) for k, a in zip(names, strategy.mean, strict=True)}
    return TrainResult(mean, 1), metrics, len(strategy.failures)


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is a SecAgg+ training message (legacy ``FitIns`` inside)."""
    return "fitins.parameters" in msg.content.array_records


def to_instruction(msg: Message) -> Instruction:
    """The instruction inside a SecAgg+ training message."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = str(config.pop(NAMES)).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    params = {k: torch.from_numpy(np.array(a)) for k, a in zip(names, arrays, strict=True)}
    return Instruction(params, config)


def to_fitres(instruction: Instruction, result: TrainResult) -> RecordDict:
    """The reply ``secaggplus_mod`` masks: the trained arrays in the instruction's order, weight 1."""
    names = sorted(instruction.params)
    metrics = {k: float(v) for k, v in result.metrics.items()}
    fitres = FitRes(Status(Code.OK, ""), _arrays(result.params, names), 1, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=True)
