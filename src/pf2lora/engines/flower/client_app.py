"""The ClientApp: our client algorithms, unchanged, behind Flower messages.

A ClientApp is re-created for every message, so nothing lives on it. What is expensive and the
same for every message (the experiment's data and the frozen base model of each method) is cached
per process (under ``pf2lora site``, :mod:`pf2lora.engines.flower.site`, once per run in the
site's process, which every message's process is forked from); what belongs to the client
(personal adapter, optimizer moments, sampler cursor, HETLoRA's rank) is kept in a file on the
node's disk, one per round it changed in (:func:`node_states`), and never sent to the server.

Messages (the server's side is :mod:`pf2lora.engines.flower.server`):

- ``query``: the experiment's config (YAML) and run directory; the reply names the node's
  partition (``partition-id`` of its node config).
- ``train``: the instruction's parameters and config; the reply is the method's ``TrainResult``.
- ``evaluate``: metrics on the client's own test split, its effective ranks, its personal size.
- ``query.save``: the client writes its own parameters and exported adapter to its disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from pf2lora.adapters.export import PeftExporter
from pf2lora.algorithms.base import ClientAlgorithm, ClientData, Instruction, TrainResult
from pf2lora.algorithms.validation import spoil
from pf2lora.config import ExperimentConfig, from_dict
from pf2lora.engines.flower.records import (
    METRIC,
    decode_params,
    encode_config,
    encode_metrics,
    encode_params,
)
from pf2lora.engines.flower.secure import is_secure, to_fitres, to_instruction
from pf2lora.engines.local import Site, save_client
from pf2lora.engines.states import DiskStates
from pf2lora.runner import prepare
from pf2lora.tasks import records_dir
from pf2lora.utils import atomic_write

log = logging.getLogger(__name__)
RUN = "pf2lora"  # the context record holding the experiment this node takes part in


def dp_clipping(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``fixedclipping_mod`` on a DP-FedAvg training message (its config names the clipping
    norm): the client's update is clipped before it leaves. Other messages, and bf16 payloads (which
    Flower's mods cannot read as numpy arrays; the server's own clipping bounds those), pass through."""
    config = msg.content.config_records.get("config") if msg.metadata.message_type == "train" else None
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    if any(array.dtype == "bfloat16" for array in msg.content["arrays"].values()):  # type: ignore[union-attr]
        return call_next(msg, context)
    return fixedclipping_mod(msg, context, call_next)


def secure_aggregation(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``secaggplus_mod`` on a SecAgg+ training message (each stage's config record names
    it): the reply's arrays leave this client masked (:mod:`.secure`). Other messages pass through."""
    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_aggregation, dp_clipping])


class InjectedFailure(RuntimeError):
    """Raised where ``flower.fail`` asks for it, to exercise the failure path."""


@dataclass
class Experiment:
    """One experiment as this process sees it: its data, and each method's client part (with the
    frozen base model it wraps), built once and shared by every node the process serves."""

    cfg: ExperimentConfig
    prepared: Any
    clients: dict[str, tuple[ClientAlgorithm, Callable[[], PeftExporter | None]]] = field(default_factory=dict)

    def client(self, name: str) -> tuple[ClientAlgorithm, Callable[[], PeftExporter | None]]:
        """Method ``name``'s client part and a maker of its PEFT exporter (None for own-model methods)."""
        if name not in self.clients:
            self.clients[name] = self._build(name)
        return self.clients[name]

    def _build(self, name: str) -> tuple[ClientAlgorithm, Callable[[], PeftExporter | None]]:
        built = self.prepared.build(name, self.cfg.for_method(name))
        return built.client, built.exporter

    def data(self, cid: int) -> tuple[ClientData, dict[str, ClientData]]:
        """Client ``cid``'s training split and what it is evaluated on (its test split, and its
        validation split where the run holds one out: :meth:`FederatedData.evaluation`)."""
        data = self.prepared.data
        return data.train[cid], data.evaluation(self.cfg.data.evaluate_test)[cid]


_EXPERIMENTS: dict[str, Experiment] = {}


def _config(text: str) -> ExperimentConfig:
    """The experiment's config from the YAML text the server sent, checked."""
    return from_dict(ExperimentConfig, yaml.safe_load(text)).validate()


HANDOFF_ENV = "PF2LORA_SITE_HANDOFF"  # under `pf2lora site`: where a new experiment's text is left


def _announce(text: str, cid: int) -> None:
    """Under ``pf2lora site``, leave the text of the experiment the server announced, and this
    node's partition, for the site's process, which prepares both once for every later message
    (written whole, then renamed in)."""
    path = os.environ.get(HANDOFF_ENV)
    if not path:
        return
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps({"experiment": text, "partition": cid})))


def experiment(text: str) -> Experiment:
    """The experiment of config ``text``, prepared once per process."""
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _EXPERIMENTS:
        cfg = _config(text)
        prepared = prepare(cfg)
        _EXPERIMENTS.clear()  # one experiment at a time per process
        _EXPERIMENTS[key] = Experiment(cfg, prepared)
    return _EXPERIMENTS[key]


def node_states(folder: Path, cid: int, server_round: int, training: bool) -> DiskStates:
    """Client ``cid``'s states on its node's disk (one file per round it changed in, the two latest
    kept), as round ``server_round`` sees them: a round it is asked to train again (the server
    resumed from an earlier checkpoint) starts from its version before that round."""
    states = DiskStates(folder)
    if training:
        states.rollback(server_round - 1, cid)
    states.round = server_round
    return states


def _partition(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id in its node config (--node-config 'partition-id=K')")
    return int(context.node_config["partition-id"])


def _site_dir(context: Context) -> Path:
    """Where this node keeps its files: its node config's ``dir``, else the run directory (one machine)."""
    record = context.state[RUN]
    return Path(str(context.node_config.get("dir", record["out"])))  # type: ignore[index]


def _session(msg: Message, context: Context) -> tuple[Experiment, int, str, Site, Path]:
    if RUN not in context.state:
        raise RuntimeError("this node was not told the experiment (no query message came first)")
    exp = experiment(str(context.state[RUN]["experiment"]))  # type: ignore[index]
    config = _message_config(msg)
    name = str(config["method"])
    cid, folder = _partition(context), _site_dir(context)
    client, _ = exp.client(name)
    server_round = int(config.get("server_round", 0))
    states = node_states(folder / "client_state" / name, cid, server_round, msg.metadata.message_type == "train")
    return exp, cid, name, Site(client, states), folder


def _message_config(msg: Message) -> dict[str, Any]:
    """The config a message carries: ours, or the legacy FitIns's of a SecAgg+ round."""
    records = msg.content.config_records
    return dict(records["fitins.config"] if "fitins.config" in records else records["config"])


def _instruction(msg: Message) -> Instruction:
    config = dict(msg.content["config"])  # type: ignore[arg-type]
    return Instruction(decode_params(msg.content["arrays"]), config)  # type: ignore[arg-type]


@app.query()
def join(msg: Message, context: Context) -> Message:
    """Take part in the experiment the server describes; say which partition this node holds."""
    config = msg.content["config"]
    cid, text = _partition(context), str(config["experiment"])  # type: ignore[index]
    cfg = _config(text)  # checked here, prepared at the first train
    if not 0 <= cid < cfg.data.num_clients:
        raise ValueError(f"partition-id {cid} is outside the experiment's {cfg.data.num_clients} clients")
    _announce(text, cid)
    context.state[RUN] = ConfigRecord({"experiment": config["experiment"], "out": config["out"]})  # type: ignore[index]
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": cid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    exp, cid, name, site, _ = _session(msg, context)
    secure = is_secure(msg)  # a SecAgg+ round: the legacy FitIns in, FitRes out (masked by secaggplus_mod)
    instruction = to_instruction(msg) if secure else _instruction(msg)
    server_round = int(instruction.config.get("server_round", 0))
    faults = [f.partition(":")[2] for f in exp.cfg.flower.fail if f.partition(":")[0] == f"{cid}@{server_round}"]
    if "" in faults:
        raise InjectedFailure(f"client {cid} fails in round {server_round} (flower.fail)")
    result = site.train(cid, instruction, exp.data(cid)[0])
    for kind in faults:  # a bad update instead of the real one (flower.fail K@R:KIND)
        result = TrainResult(spoil(result.params, kind), result.num_examples, result.metrics)
    if secure:
        return Message(to_fitres(instruction, result), reply_to=msg)
    content = RecordDict(
        {
            "arrays": encode_params(result.params, exp.cfg.train.compression),
            "metrics": encode_metrics({**result.metrics, "num-examples": result.num_examples}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    exp, cid, name, site, folder = _session(msg, context)
    train_data, test_data = exp.data(cid)
    instruction = _instruction(msg)
    # the last evaluation's per-example outputs (generated text) stay on this node's disk
    final = bool(instruction.config.get("final"))
    record = records_dir(folder, exp.cfg.task.name, name) / f"client{cid}.jsonl" if final else None
    metrics, ranks = site.evaluate(cid, instruction, test_data, train_data, record)
    personal = sum(t.numel() for t in site.state(cid).get("personal", {}).values())
    ranks_record = {f"rank.{module}": rank for module, rank in ranks.items()}
    content = RecordDict(
        {"metrics": encode_metrics({**metrics, "personal_parameters": personal}), "ranks": encode_config(ranks_record)}
    )
    return Message(content, reply_to=msg)


@app.query("save")
def save(msg: Message, context: Context) -> Message:
    """The client's own parameters and exported adapter, written to its node's disk."""
    exp, cid, name, site, folder = _session(msg, context)
    _, exporter = exp.client(name)
    state = site.state(cid)
    instruction = _instruction(msg)
    metrics = {k[len(METRIC) :]: float(v) for k, v in instruction.config.items() if k.startswith(METRIC)}
    view = site.view(cid, instruction, exp.data(cid)[0], state)
    exported = site.client.exported(view, state)
    save_client(folder, name, cid, state, exported, exporter(), exp.cfg.data.num_clients, metrics or None)
    return Message(RecordDict({"config": encode_config({"saved": str(folder)})}), reply_to=msg)
