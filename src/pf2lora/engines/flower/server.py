"""The server's side of a Flower federation: our server algorithms, unchanged, driving it.

:class:`FlowerEngine` is the Flower twin of the in-process engine: each round it asks the server
algorithm for one instruction per sampled client (HETLoRA: each its own rank), sends each as a
message to the node that holds that client's partition, and hands the replies back to the
algorithm in client order, so the same seed gives the same result on both engines. A round goes on
with the replies it got when at least ``flower.min_replies`` clients answered; who failed, and why,
is recorded in ``metrics.jsonl``. Bytes are those of the messages themselves, each way.

The run directory (config, metrics, results, plots, the common checkpoint) is written by the server;
every client writes its own parameters to its own disk (see :mod:`.client_app`). This module
imports torch, transformers and PEFT; the ServerApp's entry point (:mod:`.server_app`) imports it
only after it has told the sites the experiment, so that they load their models meanwhile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from pf2lora.adapters.export import PeftExporter
from pf2lora.algorithms.base import ClientAlgorithm, ClientData, Instruction, ServerAlgorithm, TrainResult
from pf2lora.algorithms.fedavg import clients_per_round
from pf2lora.algorithms.validation import problem
from pf2lora.compression import compress
from pf2lora.config import ExperimentConfig
from pf2lora.engines.flower.messaging import FederationError, announce, join, send_and_receive
from pf2lora.engines.flower.records import (
    METRIC,
    decode_params,
    encode_config,
    encode_params,
    message_bytes,
    param_names,
)
from pf2lora.engines.workers import failure_reasons
from pf2lora.metrics import averaged
from pf2lora.rounds import Checkpoint, Evaluation, run_rounds
from pf2lora.runner import prepare, run
from pf2lora.utils import numel

log = logging.getLogger(__name__)


class FlowerEngine:
    """One method's rounds over a Flower ``Grid``; ``nodes`` maps each client id to its node."""

    def __init__(
        self,
        grid: Grid,
        nodes: dict[int, int],
        name: str,
        cfg: ExperimentConfig,
        server: ServerAlgorithm,
        on_step: Callable[[], None] | None = None,
        audit: Path | None = None,
    ) -> None:
        """``audit``: a JSON-lines file that gets one line per reply the server received (round, kind,
        client, bytes, and the name of every tensor in it), to check what left each site."""
        self.grid, self.nodes, self.name, self.cfg, self.server = grid, nodes, name, cfg, server
        self.audit = audit
        self.client_ids = sorted(nodes)
        self.clients_of = {node: cid for cid, node in nodes.items()}
        self.on_step = on_step or (lambda: None)
        self._personal: dict[int, int] = {}

    def _exchange(
        self, kind: str, server_round: int, instructions: dict[int, Instruction], require: bool = True
    ) -> tuple[dict[int, Message], dict[int, str], dict[int, int], dict[int, int]]:
        """Send every instruction to its client's node; the replies, failures and bytes each way.
        ``require``: check here that enough clients answered (else the caller checks, after its own
        checks of the replies)."""
        messages, down = {}, {}
        for cid, instruction in instructions.items():
            content = RecordDict(
                {
                    "arrays": encode_params(instruction.params, self.cfg.train.compression),
                    "config": encode_config({**instruction.config, "server_round": server_round, "method": self.name}),
                }
            )
            messages[cid] = Message(content, dst_node_id=self.nodes[cid], message_type=kind, group_id=str(server_round))
            down[cid] = message_bytes(messages[cid])
        replies, failed, up = {}, {}, {}
        for reply in send_and_receive(self.grid, list(messages.values()), self.cfg.flower.timeout):
            cid = self.clients_of[reply.metadata.src_node_id]
            if reply.has_error():
                failed[cid] = f"{reply.error.reason}"
            else:
                replies[cid], up[cid] = reply, message_bytes(reply)
                self._record(server_round, kind, cid, reply, up[cid])
            if kind == "train":
                self.on_step()
        for cid in messages:
            if cid not in replies and cid not in failed:
                failed[cid] = f"no reply within {self.cfg.flower.timeout:g} s"
        for cid, reason in sorted(failed.items()):
            log.warning("%s round %d (%s): client %d failed: %s", self.name, server_round, kind, cid, reason)
        if require:
            self._require(kind, server_round, len(messages), len(replies), failed)
        return replies, failed, down, up

    def _require(self, kind: str, server_round: int, sent: int, good: int, failed: dict[int, str]) -> None:
        """Stop the run unless ``flower.min_replies`` (default: all) of the ``sent`` clients answered well."""
        needed = min(sent, self.cfg.flower.min_replies or sent)
        if good < needed:
            raise FederationError(
                f"{self.name} round {server_round} ({kind}): {good} of {sent} clients answered"
                f"{' with an update that passed the checks' if kind == 'train' else ''}, at least {needed} needed "
                f"({failure_reasons(failed)})"
            )

    def _record(self, server_round: int, kind: str, cid: int, reply: Message, size: int) -> None:
        if self.audit is None:
            return
        arrays = {name: param_names(record) for name, record in reply.content.array_records.items()}
        line = {"method": self.name, "round": server_round, "kind": kind, "client": cid, "bytes": size}
        with open(self.audit, "a") as fh:
            fh.write(json.dumps({**line, "arrays": arrays}) + "\n")

    def train_round(self, server_round: int) -> dict[str, Any]:
        instructions = self.server.configure_train(server_round, self.client_ids)
        if self.cfg.flower.secure_aggregation:
            return self._secure_train_round(server_round, instructions)
        replies, failed, down, up = self._exchange("train", server_round, instructions, require=False)
        results, clients, rejected = {}, {}, {}
        compression, bound = self.cfg.train.compression, self.cfg.train.update_norm_bound
        for cid in sorted(replies):
            content = replies[cid].content
            metrics = dict(content["metrics"])  # type: ignore[arg-type]
            num_examples = int(metrics.pop("num-examples"))
            # checked as it travelled (the wire dtype), then cast back to what was sent
            wire = TrainResult(decode_params(content["arrays"], cast=False), num_examples, metrics)  # type: ignore[arg-type]
            sent = instructions[cid]
            reason = problem(self.server, Instruction(compress(sent.params, compression), sent.config), wire, bound)
            if reason is not None:
                rejected[cid] = reason
                log.warning("%s round %d: client %d's update rejected: %s", self.name, server_round, cid, reason)
                continue
            params = {k: v.to(sent.params[k].dtype) if v.is_floating_point() else v for k, v in wire.params.items()}
            results[cid] = TrainResult(params, num_examples, metrics)  # type: ignore[arg-type]
            clients[cid] = {
                **metrics,
                "bytes_received": down[cid],
                "bytes_sent": up[cid],
                "parameters_received": numel(instructions[cid].params),
                "parameters_sent": numel(params),
            }
        self._require("train", server_round, len(instructions), len(results), {**failed, **rejected})
        self.server.aggregate_train(server_round, results)
        record: dict[str, Any] = {"round": server_round, "clients": clients}
        if failed:
            record["failed"] = failed
        if rejected:
            record["rejected"] = rejected
        return record

    def _secure_train_round(self, server_round: int, instructions: dict[int, Instruction]) -> dict[str, Any]:
        """The round's training under SecAgg+ (:mod:`.secure`): the server gets the mean alone, so
        it checks no single update; the audit log gets every message of the protocol."""
        from pf2lora.engines.flower.secure import AuditedGrid, secure_round

        down: dict[int, int] = dict.fromkeys(instructions, 0)
        up: dict[int, int] = dict.fromkeys(instructions, 0)

        def seen(message: Message, sent: bool) -> None:
            if sent:
                down[self.clients_of[message.metadata.dst_node_id]] += message_bytes(message)
                return
            cid = self.clients_of[message.metadata.src_node_id]
            if not message.has_error():
                up[cid] += message_bytes(message)
                self._record(server_round, "train.secagg", cid, message, message_bytes(message))

        grid = AuditedGrid(self.grid, seen)
        mean, metrics, dropped = secure_round(
            grid, self.nodes, self.name, server_round, instructions, self.cfg.flower.timeout
        )
        for _ in metrics:
            self.on_step()
        failed = {cid: "dropped out of secure aggregation" for cid in instructions if cid not in metrics}
        self._require("train", server_round, len(instructions), len(metrics) if mean is not None else 0, failed)
        if mean is not None:
            self.server.aggregate_train(server_round, {min(metrics): mean})
        clients = {
            cid: {
                **values,
                "bytes_received": down[cid],
                "bytes_sent": up[cid],
                "parameters_received": numel(instructions[cid].params),
                "parameters_sent": numel(instructions[cid].params),
            }
            for cid, values in sorted(metrics.items())
        }
        record: dict[str, Any] = {"round": server_round, "clients": clients}
        record["secure_aggregation"] = {"clients": len(metrics), "dropped": dropped}
        if failed:
            record["failed"] = failed
        return record

    def evaluate(self, server_round: int, final: bool = False) -> tuple[Evaluation, dict[str, Any]]:
        """Every client's metrics; ``final``: the last evaluation, whose per-example outputs (e.g.
        generated text) each client keeps on its own disk."""
        instructions = self.server.configure_evaluate(server_round, self.client_ids)
        if final:
            instructions = {c: Instruction(i.params, {**i.config, "final": True}) for c, i in instructions.items()}
        replies, failed, down, up = self._exchange("evaluate", server_round, instructions)
        metrics, ranks = {}, {}
        for cid in sorted(replies):
            values = dict(replies[cid].content["metrics"])  # type: ignore[arg-type]
            self._personal[cid] = int(values.pop("personal_parameters"))
            for key in set(values) - set(averaged(values)):  # the test and validation example counts
                values[key] = int(values[key])
            metrics[cid] = values
            ranks[cid] = {k[len("rank.") :]: int(v) for k, v in replies[cid].content["ranks"].items()}  # type: ignore[union-attr]
        extra: dict[str, Any] = {"eval_bytes": {"sent": sum(down.values()), "received": sum(up.values())}}
        if failed:
            extra["eval_failed"] = failed
        return (metrics, ranks), extra  # type: ignore[return-value]

    def run(
        self,
        rounds: int,
        eval_every: int,
        on_round: Callable[[dict[str, Any]], None],
        checkpoint: Checkpoint | None = None,
    ) -> Evaluation:
        """Train ``rounds`` rounds; evaluate every ``eval_every`` and after the last (as the local
        engine), going on from the server's ``checkpoint`` and leaving one each round."""
        return run_rounds(self, rounds, eval_every, on_round, checkpoint)

    def evaluate_round(self, server_round: int, final: bool) -> tuple[Evaluation, dict[str, Any]]:
        return self.evaluate(server_round, final)

    def snapshot(self) -> dict[str, Any]:
        """The server's side of the round's checkpoint (each client keeps its state on its own disk,
        versioned by round, and goes back to the version before a round it is asked to train again)."""
        return {"server": self.server.state(), "personal": dict(self._personal)}

    def restore(self, saved: dict[str, Any], last_round: int) -> None:
        if saved:
            self.server.load_state(saved["server"])
            self._personal = dict(saved["personal"])

    def personal_parameters(self) -> dict[int, int]:
        return dict(self._personal)

    def save_clients(
        self,
        out: Path,
        name: str,
        make_exporter: Callable[[], PeftExporter | None],
        server_round: int,
        metrics: dict[int, dict[str, float]] | None = None,
    ) -> None:
        """Each client writes its own parameters and exported adapter on its own disk (the server never
        holds them, and never builds an exporter); ``out`` and ``make_exporter`` serve the local engine.
        Each client is told its final metrics, for its adapter's model card."""
        instructions = self.server.configure_evaluate(server_round, self.client_ids)
        for cid, metric in (metrics or {}).items():
            if cid in instructions:
                extra = {f"{METRIC}{k}": float(v) for k, v in metric.items()}
                instructions[cid] = Instruction(instructions[cid].params, {**instructions[cid].config, **extra})
        self._exchange("query.save", server_round, instructions)


def serve(
    grid: Grid,
    cfg: ExperimentConfig,
    out: Path,
    progress: Any = None,
    prepared: Any = None,
    resume: bool = False,
    announced: set[str] | None = None,
) -> dict[str, Any]:
    """The whole experiment on the federation behind ``grid``; writes the run directory ``out``
    (``resume``: continues the run killed there, see :func:`pf2lora.runner.run`). ``announced``:
    the messages of an :func:`~.messaging.announce` already sent (else it is sent here first)."""
    sent = announce(grid, cfg, out) if announced is None else announced
    prepared = prepare(cfg) if prepared is None else prepared
    nodes = join(grid, cfg, sent)
    out.mkdir(parents=True, exist_ok=True)
    if not resume or not (out / "messages.jsonl").exists():
        (out / "messages.jsonl").write_text("")

    def engine(
        out: Path,
        name: str,
        mcfg: ExperimentConfig,
        server: ServerAlgorithm,
        client: ClientAlgorithm,
        train: Sequence[ClientData],
        test: Sequence[ClientData],
        progress: Callable[[str, int], Callable[[], None]] | None,
    ) -> FlowerEngine:
        steps = mcfg.train.rounds * clients_per_round(len(nodes), mcfg.train.client_fraction)
        on_step = progress(name, steps) if progress else None
        return FlowerEngine(grid, nodes, name, mcfg, server, on_step, out / "messages.jsonl")

    return run(prepared, out, engine, progress, resume)
