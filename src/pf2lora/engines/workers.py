"""Worker processes that train and evaluate different clients of a round side by side.

The engine's process builds the frozen base model, the client algorithm and every client's data,
then forks the workers: each inherits all three copy-on-write, so the base model's weights are
shared between the processes, not copied (a worker's own memory is its activations and the state
of the client it is training). Per task, the engine sends a worker the client's id, the server's
instruction and the client's state, and gets back the reply and the new state; states stay with
the engine (in memory or on disk), so a worker that dies loses only the client it was training.

Why fork and not spawn: a spawned worker would load the model again (and keep its own copy). Why
our own small pool and not ``concurrent.futures``: a dead worker must be reported by the client it
held and replaced, without losing the pool's other work, which ``ProcessPoolExecutor`` does not do
(it breaks the whole pool). Messages are pickled by the standard pickler (tensors by value), so a
killed worker leaves no shared-memory segment behind.

One constraint of fork: GNU OpenMP (torch's CPU thread pool here) cannot run a multi-threaded
region in a child forked after the parent ran one. The engine's process therefore computes with one
thread when it uses workers (:func:`pf2lora.parallelism.in_process`, applied before the model is
loaded), and each worker checks at start that its threads run;
where they hang (a parent that already ran multi-threaded torch, as in a notebook), the pool falls
back to one thread per worker and says so.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import pickle
import signal
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from pf2lora.utils import release_free_memory

log = logging.getLogger(__name__)

STARTUP_SECONDS = 5.0  # a worker answers in well under a second; a hung one never does


class WorkerDied(RuntimeError):
    """A worker process ended while it held a client's task (killed, out of memory, crashed)."""


def failure_reasons(failed: dict[int, str]) -> str:
    """``{client: reason}`` as one line, by client (for errors that name the clients that failed)."""
    return "; ".join(f"client {c}: {r}" for c, r in sorted(failed.items()))


@dataclass
class Task:
    """One client's work: ``kind`` (train | evaluate) and the arguments of ``work(kind, cid, *args)``."""

    kind: str
    cid: int
    args: tuple[Any, ...]


Work = Callable[..., Any]


def settle_before_fork() -> None:
    """Make what this process holds now cheap to share with the processes it forks next."""
    gc.collect()
    gc.freeze()  # objects alive now are not touched by the children's collectors: fewer pages copied
    release_free_memory()  # free heap goes back to the OS, not copied into each child on reuse


class WorkerPool:
    """``size`` forked workers of ``threads`` threads, each running ``work(kind, cid, *args)`` for
    the tasks it is handed. Start it after everything the workers need is built (they inherit it)."""

    def __init__(self, work: Work, size: int, threads: int) -> None:
        self.work, self.size, self.threads = work, size, threads
        self._workers: list[_Worker] = []

    def start(self) -> None:
        if self._workers:
            return
        settle_before_fork()
        ready = self._fork_all()
        if not ready and self.threads > 1:
            log.warning(
                "worker processes hang at %d threads: this process ran multi-threaded torch before it "
                "forked them (GNU OpenMP is not fork-safe); using 1 thread per worker",
                self.threads,
            )
            self.close()
            self.threads = 1
            ready = self._fork_all()
        if not ready:
            self.close()
            raise WorkerDied("worker processes did not start")

    def _fork_all(self) -> bool:
        """Fork the pool's workers; whether every one passed its start-up check."""
        self._workers = [self._fork() for _ in range(self.size)]
        return all([w.ready() for w in self._workers])  # a list: every worker's check is read

    def _fork(self) -> _Worker:
        return _Worker(self.work, self.threads)

    def run(self, tasks: Iterable[Task], on_done: Callable[[Task, Any], None]) -> dict[int, str]:
        """Run ``tasks`` (drawn one at a time, as workers come free), each on the first free worker;
        ``on_done(task, value)`` as each finishes (in this process, in the order they finish). A task
        whose worker dies is not retried: it is returned in ``{cid: reason}`` and its worker
        replaced. An exception raised by ``work`` is raised here once the running tasks have ended;
        Ctrl-C stops the workers at once."""
        self.start()
        todo, failed = iter(tasks), {}
        busy: dict[_Worker, Task] = {}
        error: BaseException | None = None
        try:
            while True:
                for worker in self._workers:
                    if worker not in busy and error is None and (task := next(todo, None)) is not None:
                        busy[worker] = task
                        worker.send(task)
                if not busy:
                    break
                ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
                for worker in [w for w in busy if w.conn in ready or w.process.sentinel in ready]:
                    task = busy.pop(worker)
                    try:
                        ok, value = worker.receive()
                    except (EOFError, OSError):
                        reason = worker.death()
                        log.warning("client %d: its worker process died (%s)", task.cid, reason)
                        failed[task.cid] = f"its worker process died ({reason})"
                        self._replace(worker)
                        continue
                    if ok:
                        on_done(task, value)
                    elif error is None:
                        error = value
        except BaseException:  # Ctrl-C, or an error in on_done: stop the workers
            self.close()
            raise
        if error is not None:
            raise error
        return failed

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        fresh = self._fork()
        if not fresh.ready():
            raise WorkerDied("a replacement worker process did not start")
        self._workers[self._workers.index(worker)] = fresh

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []
        gc.unfreeze()

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]


class _Worker:
    """One forked process and the pipe to it."""

    def __init__(self, work: Work, threads: int) -> None:
        context = multiprocessing.get_context("fork")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, work, threads), daemon=True)
        self.process.start()
        child.close()

    def ready(self) -> bool:
        """Whether the worker answered its start-up check in time (its threads run)."""
        if not self.conn.poll(STARTUP_SECONDS):
            return False
        try:
            return self.conn.recv_bytes() == b"ready"
        except (EOFError, OSError):
            return False

    def send(self, task: Task) -> None:
        self.conn.send_bytes(pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self) -> tuple[bool, Any]:
        return pickle.loads(self.conn.recv_bytes())

    def death(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is None:
            return "no answer"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def stop(self) -> None:
        self.conn.close()
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _serve(conn: Connection, work: Work, threads: int) -> None:
    """A worker's loop: tasks in, ``(True, value)`` or ``(False, exception)`` out, until the pipe
    closes. Ctrl-C is the engine's to handle: the worker ignores it and is stopped by the engine."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    torch.ones(1 << 20).add_(1)  # a multi-threaded region: hangs here, not mid-task, if OpenMP cannot
    conn.send_bytes(b"ready")
    while True:
        try:
            task: Task = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            reply: tuple[bool, Any] = (True, work(task.kind, task.cid, *task.args))
        except Exception as err:  # noqa: BLE001 - handed to the engine, raised there
            err.add_note(f"in the worker process of client {task.cid}:\n{traceback.format_exc()}")
            reply = (False, _portable(err))
        conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
        del task, reply
        release_free_memory()  # the task's freed activations back to the OS: between tasks a worker
        # holds what it inherited, not the heap its largest step left behind


def _portable(err: Exception) -> Exception:
    """``err`` if it survives pickling, else a RuntimeError with its traceback."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001 - any exception type a user's method may raise
        return RuntimeError("".join(traceback.format_exception(err)))
