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

from safetensors.torch import save_file

from pf2lora.adapters.export import PeftExporter
from pf2lora.algorithms.base import (
    ClientAlgorithm,
    ClientData,
    ClientState,
    Instruction,
    Params,
    ServerAlgorithm,
    TrainResult,
)
from pf2lora.algorithms.fedavg import clients_per_round
from pf2lora.algorithms.validation import problem
from pf2lora.compression import transmit
from pf2lora.config import ExperimentConfig
from pf2lora.engines.states import DiskStates, Packed, PackedStates, pack, unpack
from pf2lora.engines.workers import Task, WorkerDied, WorkerPool, failure_reasons
from pf2lora.families import model_device
from pf2lora.metrics import VALIDATION_PREFIX
from pf2lora.parallelism import Plan, plan
from pf2lora.rounds import Checkpoint, Evaluation, Record, run_rounds
from pf2lora.tasks import records_dir
from pf2lora.utils import numel, release_free_memory

log = logging.getLogger(__name__)


def save_client(
    out: Path,
    name: str,
    cid: int,
    state: ClientState,
    exported: Params,
    exporter: PeftExporter | None,
    num_clients: int = 1,
    metrics: dict[str, float] | None = None,
) -> None:
    """What stays with client ``cid`` after method ``name``: its own parameters
    (``checkpoints/<name>/{personal,adapter}_client<cid>.safetensors``) and, for the LoRA methods,
    the model it evaluates as one stock PEFT adapter (``adapters/<name>/client<cid>``) with its
    model card (``metrics``: its final test metrics)."""
    folder = out / "checkpoints" / name
    for key in ("personal", "adapter"):  # pFedLoRA keeps its own adapter as well
        if state.get(key):
            folder.mkdir(parents=True, exist_ok=True)
            own = {k: v.contiguous() for k, v in state[key].items()}
            save_file(own, str(folder / f"{key}_client{cid}.safetensors"))
    if exporter is not None:
        exporter.save(exported, out / "adapters" / name / f"client{cid}", cid, num_clients, metrics)


class Site:
    """One client's side of a round, the same on every engine: its state in, the method's training
    or evaluation, its state out. ``states`` is wherever the engine keeps client states (packed in
    memory, on disk, or a Flower node's context)."""

    def __init__(self, client: ClientAlgorithm, states: MutableMapping[int, ClientState]) -> None:
        self.client, self.states = client, states

    def state(self, cid: int) -> ClientState:
        if cid not in self.states:
            state = self.client.init_state(cid)
            self.states[cid] = state  # stored as a copy (packed, on disk, or serialized)
            return state
        return self.states[cid]

    def train(self, cid: int, instruction: Instruction, data: ClientData) -> TrainResult:
        result, self.states[cid] = self.client.train(cid, instruction, self.state(cid), data)
        return result

    def view(
        self, cid: int, instruction: Instruction, own_train: ClientData | None, state: ClientState | None = None
    ) -> Instruction:
        """What the client evaluates: the instruction as it arrived, adapted by the method to the
        client's own training data where it does that (Per-FedAvg)."""
        return self.client.personalize(cid, instruction, self.state(cid) if state is None else state, own_train)

    def evaluate(
        self,
        cid: int,
        instruction: Instruction,
        test: ClientData | dict[str, ClientData],
        own_train: ClientData | None,
        record: Path | None = None,
    ) -> tuple[dict[str, float], dict[str, int]]:
        """Metrics on the client's evaluation data and its effective rank per adapted module.
        ``test``: its test split, or a mapping of split names to its data (an item of
        :class:`~pf2lora.data.text.EvalSets`), whose validation split's metrics are reported as
        ``val_<metric>``. ``record``: where the client writes the task's per-example outputs on its
        test split (generated text), if any."""
        state = self.state(cid)
        view = self.view(cid, instruction, own_train, state)
        sets = test if isinstance(test, dict) else {"test": test}
        metrics: dict[str, float] = {}
        for split, data in sets.items():
            if split == "test":
                metrics.update(self.client.evaluate(cid, view, state, data, record))
            else:
                found = self.client.evaluate(cid, view, state, data, None)
                metrics.update({f"{VALIDATION_PREFIX}{k}": v for k, v in found.items()})
        return metrics, self.client.effective_ranks(view, state)


class RoundFailed(RuntimeError):
    """Fewer of a round's clients than ``flower.min_replies`` sent an update that passed the checks."""


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
        records: Path | None = None,
        workers: Plan | None = None,
        norm_bound: float | None = None,
        min_replies: int | None = None,
        mirror: Path | None = None,
    ) -> None:
        """``train`` and ``test``: each client's splits. A method that trains on pooled data
        (centralized) passes one training set and is still evaluated on every test split.
        ``state_dir``: keep client states on disk there instead of in memory; ``mirror``: keep them
        in memory and write each as it changes there too (either way, versioned by round for a
        resumed run). ``compression``: none | fp16 | bf16, the dtype of what travels each way.
        ``records``: a folder where the final evaluation writes each client's per-example outputs
        (``client<k>.jsonl``) for tasks that keep them. ``workers``: train and evaluate a round's
        clients in the worker processes this plan names (:mod:`pf2lora.engines.workers`; None or a
        plan of 0 workers: one after another in this process). Either way a client's state lives
        here and its results are the same for the same threads per client. Every update is checked
        before it is aggregated (:mod:`pf2lora.algorithms.validation`, ``norm_bound`` its optional
        bound); a rejected one is recorded under the round's ``rejected``. ``min_replies``: the
        least number of a round's clients whose update must arrive and pass (None: one), else
        :class:`RoundFailed`."""
        self.compression, self.records = compression, records
        self.norm_bound, self.min_replies = norm_bound, min_replies
        self.server, self.client = server, client
        self.train_data, self.test_data = train, test
        self.states: PackedStates | DiskStates = (
            DiskStates(state_dir) if state_dir else PackedStates(DiskStates(mirror) if mirror else None)
        )
        self.site = Site(client, self.states)
        self.on_step = on_step or (lambda: None)
        self.pool = None
        if workers is not None and workers.parallel:
            self.pool = WorkerPool(self._work, workers.workers, workers.threads or 1)
            for split in (train, test):  # data tokenized on first use is tokenized here, once, for
                for cid in range(len(split)):  # the workers to inherit (not once per worker)
                    split[cid]

    def _work(self, kind: str, cid: int, instruction: Instruction, state: Packed, *rest: Any) -> Any:
        """What a worker process does for client ``cid`` (its data from the splits it inherited).
        States cross the pipe packed: a state's tensors are views of one buffer per dtype, and
        pickle would write the whole buffer once per view (70 MB for a 0.7 MB PF2LoRA state)."""
        site = Site(self.client, {cid: unpack(state, copy=False)})  # this process's own copy
        if kind == "train":
            result = site.train(cid, instruction, self.train_data[cid])
            return result, pack(site.states[cid])
        (record,) = rest
        return site.evaluate(cid, instruction, self.test_data[cid], self.own_train(cid), record)

    def close(self) -> None:
        """Stop the worker processes, if any (a later round starts them again)."""
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client_ids(self) -> list[int]:
        """The clients that are evaluated (each has a test split)."""
        return list(range(len(self.test_data)))

    @property
    def train_ids(self) -> list[int]:
        return list(range(len(self.train_data)))

    def state(self, cid: int) -> ClientState:
        return self.site.state(cid)

    def packed_state(self, cid: int) -> Packed:
        """Client ``cid``'s state packed as the store holds it (sent to a worker as it is)."""
        if cid not in self.states:
            self.site.state(cid)  # its initial state, stored
        return self.states.packed(cid)

    def own_train(self, cid: int) -> ClientData | None:
        """Client ``cid``'s training split (None when the method trains on pooled data)."""
        return self.train_data[cid] if len(self.train_data) == len(self.test_data) else None

    def train_round(self, server_round: int) -> Record:
        """One communication round: local training on the sampled clients, then aggregation of the
        replies in the order the server asked for them. A client whose worker process died is left
        out of the aggregate and named under ``failed``."""
        self.states.round = server_round
        instructions = self.server.configure_train(server_round, self.train_ids)
        received, down = {}, {}
        for cid, instruction in instructions.items():
            params, down[cid] = transmit(instruction.params, self.compression)
            received[cid] = Instruction(params, instruction.config)
        replies, failed = self._train(received)
        if failed and not replies:
            raise WorkerDied(f"round {server_round}: no client finished its training ({failure_reasons(failed)})")
        rejected = {}
        for cid in list(replies):
            reason = problem(self.server, received[cid], replies[cid], self.norm_bound)
            if reason is not None:
                rejected[cid] = reason
                del replies[cid]
                log.warning("round %d: client %d's update rejected: %s", server_round, cid, reason)
        needed = min(len(instructions), self.min_replies or 1)
        if len(replies) < needed:
            raise RoundFailed(
                f"round {server_round}: {len(replies)} of {len(instructions)} clients' updates arrived and passed "
                f"the server's checks, at least {needed} needed ({failure_reasons({**failed, **rejected})})"
            )
        results, clients = {}, {}
        for cid, instruction in instructions.items():
            if cid not in replies:
                continue
            result = replies.pop(cid)
            params, up = transmit(result.params, self.compression)
            results[cid] = TrainResult(params, result.num_examples, result.metrics)
            clients[cid] = {
                **result.metrics,
                "bytes_received": down[cid],
                "bytes_sent": up,
                "parameters_received": numel(instruction.params),
                "parameters_sent": numel(result.params),
            }
        del received
        self.server.aggregate_train(server_round, results)
        del results
        release_free_memory()
        record: Record = {"round": server_round, "clients": clients}
        if failed:
            record["failed"] = failed
        if rejected:
            record["rejected"] = rejected
        return record

    def _train(self, received: dict[int, Instruction]) -> tuple[dict[int, TrainResult], dict[int, str]]:
        """Each client's training on what it received: its reply, and the clients that failed."""
        replies: dict[int, TrainResult] = {}
        if self.pool is None:
            for cid, instruction in received.items():
                replies[cid] = self.site.train(cid, instruction, self.train_data[cid])
                self.on_step()
            return replies, {}

        def done(task: Task, value: tuple[TrainResult, Packed]) -> None:
            replies[task.cid] = value[0]
            self.states.write(task.cid, value[1])  # held as it arrived
            self.on_step()

        tasks = (Task("train", cid, (instruction, self.packed_state(cid))) for cid, instruction in received.items())
        return replies, self.pool.run(tasks, done)

    def evaluate(self, server_round: int, final: bool = False) -> Evaluation:
        """Every client on its own test split; its effective rank per adapted module. ``final``: the
        last evaluation, whose per-example outputs are kept under ``records``."""
        metrics, ranks = {}, {}
        instructions = self.server.configure_evaluate(server_round, self.client_ids)

        def record(cid: int) -> Path | None:
            return self.records / f"client{cid}.jsonl" if final and self.records is not None else None

        if self.pool is None:
            for cid, instruction in instructions.items():
                own_train = self.own_train(cid)
                metrics[cid], ranks[cid] = self.site.evaluate(
                    cid, self.received(instruction), self.test_data[cid], own_train, record(cid)
                )
            return metrics, ranks

        def done(task: Task, value: tuple[dict[str, float], dict[str, int]]) -> None:
            metrics[task.cid], ranks[task.cid] = value

        tasks = (
            Task("evaluate", cid, (self.received(i), self.packed_state(cid), record(cid)))
            for cid, i in instructions.items()
        )
        failed = self.pool.run(tasks, done)
        if failed:
            raise WorkerDied(f"round {server_round}: evaluation failed ({failure_reasons(failed)})")
        return {c: metrics[c] for c in instructions}, {c: ranks[c] for c in instructions}

    def client_view(self, cid: int, instruction: Instruction, state: ClientState | None = None) -> Instruction:
        """What client ``cid`` evaluates: the server's evaluation instruction as it arrives, adapted
        by the method to the client's own training data where it does that (Per-FedAvg)."""
        return self.site.view(cid, self.received(instruction), self.own_train(cid), state)

    def received(self, instruction: Instruction) -> Instruction:
        """``instruction`` as a client gets it: its parameters through the wire dtype and back."""
        return Instruction(transmit(instruction.params, self.compression)[0], instruction.config)

    def personal_parameters(self) -> dict[int, int]:
        """Size of each evaluated client's own parameters (its personal adapter or local model)."""
        return {cid: numel(self.state(cid).get("personal", {})) for cid in self.client_ids}

    def save_clients(
        self,
        out: Path,
        name: str,
        make_exporter: Callable[[], PeftExporter | None],
        server_round: int,
        metrics: dict[int, dict[str, float]] | None = None,
    ) -> None:
        """Every client's own parameters and exported adapter under ``out`` (see :func:`save_client`);
        ``metrics``: each client's final test metrics, for its model card."""
        exporter, metrics = make_exporter(), metrics or {}
        for cid, instruction in self.server.configure_evaluate(server_round, self.client_ids).items():
            state = self.state(cid)
            view = self.client_view(cid, instruction, state)
            exported = self.client.exported(view, state)
            save_client(out, name, cid, state, exported, exporter, len(self.client_ids), metrics.get(cid))

    def run(
        self,
        rounds: int,
        eval_every: int = 0,
        on_round: Callable[[Record], None] | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> Evaluation:
        """Train ``rounds`` rounds; evaluate every ``eval_every`` and after the last (``rounds`` = 0:
        evaluate the initial model only), going on from ``checkpoint`` and leaving one each round
        (:func:`~pf2lora.rounds.run_rounds`). Returns the final per-client metrics and effective ranks."""
        with self:
            return run_rounds(self, rounds, eval_every, on_round, checkpoint)

    def evaluate_round(self, server_round: int, final: bool) -> tuple[Evaluation, Record]:
        self.states.round = server_round  # a client first seen here keeps its initial state as of this round
        return self.evaluate(server_round, final), {}

    def snapshot(self) -> dict[str, Any]:
        """The round's checkpoint: the server's state (client states are on disk already)."""
        return {"server": self.server.state()}

    def restore(self, saved: dict[str, Any], last_round: int) -> None:
        """Go on after round ``last_round``: the server as ``saved``, every client as then."""
        if saved:
            self.server.load_state(saved["server"])
        self.states.rollback(last_round)


def local_engine(
    out: Path,
    name: str,
    cfg: ExperimentConfig,
    server: ServerAlgorithm,
    client: ClientAlgorithm,
    train: Sequence[ClientData],
    test: Sequence[ClientData],
    progress: Callable[[str, int], Callable[[], None]] | None,
) -> LocalEngine:
    """The in-process engine for method ``name`` of a run (the runner's engine factory): client
    state in memory (written as it changes under ``out/resume/<name>/clients``, for a resumed run)
    or under ``out/client_state/<name>``, the configured compression, a progress
    bar of client-rounds, each client's per-example outputs under ``out``, a round's clients in
    ``train.workers`` processes (:func:`~pf2lora.engines.workers.plan`)."""
    per_round = clients_per_round(len(train), cfg.train.client_fraction)
    steps = cfg.train.rounds * per_round
    disk = cfg.train.client_state == "disk"
    state_dir, mirror = (out / "client_state" / name, None) if disk else (None, out / "resume" / name / "clients")
    on_step = progress(name, steps) if progress else None
    records = records_dir(out, cfg.task.name, name)
    on_gpu = model_device(cfg).type == "cuda"
    workers = plan(1 if on_gpu else cfg.train.workers, cfg.train.threads, max(per_round, len(test)))
    return LocalEngine(
        server,
        client,
        train,
        test,
        on_step,
        state_dir,
        cfg.train.compression,
        records,
        workers,
        cfg.train.update_norm_bound,
        cfg.flower.min_replies,
        mirror,
    )
