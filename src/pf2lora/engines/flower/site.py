"""A deployed site that loads its base model and data once per run, not once per message.

Flower 1.41 runs every ClientApp message in a new process (``flwr-clientapp`` handles one task and
exits; Flower's own warm executors are Kubernetes-only and not for ClientApps), so a site that
runs Flower's default SuperExec pays for the Python start, the imports, the data preparation and
the model load on every message. This module is a site's SuperExec with one change: Flower's own
task loop (:func:`flwr.supercore.superexec.run_superexec.run_superexec`) with an executor that
starts each task by forking this long-running process instead of starting a new one. The fork
runs Flower's own ``run_clientapp`` (what ``flwr-clientapp`` runs) and exits, so each message is
still isolated in its own process, with Flower's protocol unchanged; what it inherits is the
experiment this process prepared (data, and each method's client with its frozen base model).

The site needs no configuration of its own: the experiment comes from the server, as with Flower's
default SuperExec. The first ClientApp (the server's ``query``) leaves its text and the node's
partition in a hand-off file; this process prepares both (the data of that partition only) as soon
as they appear (between tasks, while Flower's SuperNode waits for the server's next message), with
one thread (GNU OpenMP cannot run threads in a child forked after its parent ran a multi-threaded
region), and every later message starts with it already loaded, with ``train.threads`` threads (at
most ``$PF2LORA_CORES``, where sites share a machine).

Run it next to a SuperNode started with ``--isolation process``::

    flower-supernode --insecure --superlink SERVER:9092 --isolation process --port 9094 ...
    pf2lora site --runtime-api-address 127.0.0.1:9094 --insecure

A host that runs several SuperNodes (several partitions on one machine, or a federation on
loopback) can serve all of them from one process, ``--runtime-api-address`` once per SuperNode:
it imports the libraries once (torch, transformers, PEFT and Flower: ~11 s of CPU per process on
a 2-core machine), then forks one task loop per SuperNode (:func:`serve_many`). Each loop is then
exactly the one above, with its own experiment, partition and forks; the libraries' memory is
shared between them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.exit import exit_handler
from flwr.supercore.superexec import run_superexec as superexec
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import run_clientapp

from pf2lora.engines.flower import client_app
from pf2lora.engines.workers import settle_before_fork
from pf2lora.parallelism import available_cores, will_fork

log = logging.getLogger(__name__)
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting of how often its loop asks


class ForkExecutor:
    """Flower's ``Executor`` protocol (``flwr.supercore.superexec.executor.types``): each ClientApp
    task runs in a fork of this process. Other task types are not a site's and are not taken."""

    def __init__(self, handoff: Path, name: str = "site") -> None:
        self.handoff, self.name, self.children, self.loaded = handoff, name, {}, ""
        self.threads = available_cores()

    def get_eligible_capacity(
        self, supported_task_types: set[TaskType], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[TaskType], set[str]]:
        return {t for t in supported_task_types if t == TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, **_: object) -> None:
        """A fork needs no capacity: the SuperNode hands one task per message."""

    def warm(self) -> None:
        """Prepare the experiment a ClientApp announced, if it is new, in this process: every
        method's client, and the data of this site's partition (no other's)."""
        try:
            announced = json.loads(self.handoff.read_text())
        except (OSError, ValueError):  # none yet (or being renamed in)
            return
        text = announced["experiment"]
        if text == self.loaded:
            return
        self.loaded = text
        will_fork()  # preparing keeps this process at one thread, whatever train.threads says
        torch.set_num_threads(1)
        try:
            exp = client_app.experiment(text)
            for name in exp.cfg.algorithms:
                exp.client(name)
            exp.data(int(announced["partition"]))
        except Exception as err:  # noqa: BLE001 - the ClientApps prepare it themselves and report why they fail
            log.warning(
                "%s: could not prepare the announced experiment here (%s); each message prepares it", self.name, err
            )
            return
        cores = available_cores()  # $PF2LORA_CORES where sites share a machine
        self.threads = min(exp.cfg.train.threads or cores, cores)
        settle_before_fork()  # what is alive now is shared with every fork
        log.info("%s: experiment %s prepared once; every message forks from it", self.name, exp.cfg.name)

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"a pf2lora site runs ClientApps only, not {spec.task_type}")
        self.reconcile()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.children.clear()  # the fork owns none of its siblings
            _child(spec, self.threads)  # does not return
        self.children[pid] = spec.task_id
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the forks that ended; prepare a newly announced experiment (between tasks: Flower's
        loop calls this before it asks for the next one)."""
        self.warm()
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                task = self.children.pop(pid)
                if status:
                    log.warning("%s: the ClientApp of task %s ended with status %s", self.name, task, status)

    def close(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.children.clear()


def _child(spec: ExecutionSpec, threads: int) -> None:
    """One ClientApp task, as ``flwr-clientapp`` runs it, in this fork; then the fork exits."""

    def task() -> None:
        exit_handler.registered_exit_handlers.clear()  # the task loop's (close its client, the executor)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        torch.set_num_threads(threads)
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            runtime_dependency_install=spec.runtime_dependency_install,
        )

    _exit_after(task)


def _exit_after(body: Callable[[], None]) -> NoReturn:
    """Run ``body`` in a fork and end the fork with its exit status (0, a ``SystemExit``'s code, as
    Flower's ``flwr_exit`` raises, or 1 after printing an error); never return into the forking code."""
    code = 1
    try:
        body()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit the fork
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve_many(addresses: Sequence[str], insecure: bool, root_certificates: str | None = None) -> int:
    """The task loops of several SuperNodes on this host from one process: :func:`serve` for each
    Runtime API in ``addresses``, each in a fork of this process (which has imported the libraries
    once); this process waits for them. SIGTERM is passed on to every loop; Ctrl-C reaches them from
    the terminal. A loop that ends leaves the others running. Returns 0 when every loop ended
    cleanly, else the first failed loop's status."""
    if len(addresses) == 1:
        serve(addresses[0], insecure, root_certificates)
        return 0
    loops: dict[int, str] = {}
    for address in addresses:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _exit_after(lambda address=address: serve(address, insecure, root_certificates))
        loops[pid] = address

    def stop(signum: int, _: object) -> None:
        for pid in loops:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    handlers = signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, signal.SIG_IGN)
    status = 0  # SIGINT ignored here: the terminal's Ctrl-C reaches each loop itself
    try:
        while loops:
            pid, raw = os.wait()
            address = loops.pop(pid, None)
            code = os.waitstatus_to_exitcode(raw)
            if address is not None and code != 0:
                log.warning("site %s: its task loop ended with status %s", address, code)
                status = status or (code if code > 0 else 1)
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    return status


def serve(runtime_api_address: str, insecure: bool, root_certificates: str | None = None) -> None:
    """Flower's SuperExec loop for one SuperNode's Runtime API, each task forked from here."""
    folder = Path(tempfile.mkdtemp(prefix="pf2lora-site-"))
    handoff = folder / "experiment.yaml"
    os.environ[client_app.HANDOFF_ENV] = str(handoff)
    os.environ.setdefault(POLL_ENV, "0.2")  # Flower's SuperExec asks for a new task every 1 s
    torch.set_num_threads(1)  # until an experiment says otherwise, this process never runs threads
    executor = ForkExecutor(handoff, f"site {runtime_api_address}")

    def executor_for(*_: object, **__: object) -> ForkExecutor:
        return executor

    superexec.get_executor = executor_for  # type: ignore[assignment] - run_superexec's one seam for executors
    try:
        superexec.run_superexec(
            runtime_api_address=runtime_api_address,
            insecure=insecure,
            root_certificates_path=root_certificates,
            executor_type=ExecutorType.SUBPROCESS,
        )
    finally:
        executor.close()
        handoff.unlink(missing_ok=True)
        folder.rmdir()
