"""The server's messaging that needs no model: telling the SuperNodes the experiment, learning
which partition each holds, and Flower's ``send_and_receive`` with a shorter poll. Imported by the
ServerApp's light entry module (:mod:`.server_app`) and by :mod:`.server` alike.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pf2lora.config import ExperimentConfig


class FederationError(RuntimeError):
    """The federation cannot go on: too few clients connected or answered."""


POLL_SECONDS = 0.2  # Flower's Grid.send_and_receive looks for replies every 3 s


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """``grid.send_and_receive`` (push, then pull the replies until all came or ``timeout``), polling
    every :data:`POLL_SECONDS`: Flower's own waits 3 s between pulls, which on a run of short rounds
    is most of the time a round takes."""
    if not messages:  # a round that sampled no client (DP-FedAvg's Poisson sampling)
        return []
    return receive(grid, set(grid.push_messages(messages)), timeout)


def receive(grid: Grid, waiting: set[str], timeout: float) -> list[Message]:
    """The replies to the messages ``waiting`` (their ids), pulled until all came or ``timeout``."""
    deadline, replies = time.monotonic() + timeout, []
    while waiting:
        received = list(grid.pull_messages(waiting))
        replies += received
        waiting -= {m.metadata.reply_to_message_id for m in received}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
    return replies


def announce(grid: Grid, cfg: ExperimentConfig, out: Path) -> set[str]:
    """Wait for the SuperNodes and tell each the experiment (a site prepares it as soon as it is told,
    while the server prepares its own side); the ids of the messages sent, for :func:`join`."""
    need, deadline = cfg.data.num_clients, time.monotonic() + cfg.flower.connect_timeout
    while len(node_ids := list(grid.get_node_ids())) < need:
        if time.monotonic() > deadline:
            raise FederationError(
                f"{len(node_ids)} of {need} SuperNodes connected within {cfg.flower.connect_timeout:g} s"
            )
        time.sleep(0.5)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    content = RecordDict({"config": ConfigRecord({"experiment": text, "out": str(out.resolve())})})
    return set(grid.push_messages([Message(content, dst_node_id=node, message_type="query") for node in node_ids]))


def join(grid: Grid, cfg: ExperimentConfig, sent: set[str]) -> dict[int, int]:
    """The SuperNodes' answers to :func:`announce`: each client id mapped to the node holding its partition."""
    need, nodes = cfg.data.num_clients, {}
    for reply in receive(grid, sent, cfg.flower.connect_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FederationError(f"SuperNode {node} cannot join: {reply.error.reason}")
        cid = int(reply.content["metrics"]["partition-id"])  # type: ignore[index]
        if cid in nodes:
            raise FederationError(f"SuperNodes {nodes[cid]} and {node} both hold partition-id {cid}")
        nodes[cid] = node
    missing = sorted(set(range(need)) - set(nodes))
    if missing:
        raise FederationError(f"no SuperNode answered for partition-id {', '.join(map(str, missing))}")
    return nodes
