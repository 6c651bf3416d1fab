"""How many cores a run may use and how its clients are spread over them.

Decided before anything is computed, because the engine's own process must stay on one thread
when it forks worker processes (see :mod:`pf2lora.engines.workers`): the families set the
process's threads from :func:`in_process` before they load a model, and the local engine spreads
each method's clients with :func:`plan`.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass

CORES_ENV = "PF2LORA_CORES"


def available_cores() -> int:
    """The cores this process may use: ``$PF2LORA_CORES`` where set (``compare --jobs`` sets it for
    each of its runs), else the CPUs this process is allowed to run on."""
    if os.environ.get(CORES_ENV, "").isdigit() and int(os.environ[CORES_ENV]) >= 1:
        return int(os.environ[CORES_ENV])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_FORKS = False  # this process forks the processes that compute (a `pf2lora site`)


def will_fork() -> None:
    """This process will fork the processes that compute: it must never run threads itself (GNU
    OpenMP cannot run threads in a fork of a process that did), whatever ``train.threads`` says."""
    global _FORKS
    _FORKS = True


def forks() -> bool:
    """Whether :func:`will_fork` was called in this process."""
    return _FORKS


@dataclass(frozen=True)
class Plan:
    """Where a method's clients train: in ``workers`` processes of ``threads`` torch threads each,
    or (``workers`` = 0) one after another in the engine's own process at ``threads`` (None there:
    torch's default)."""

    workers: int
    threads: int | None

    @property
    def parallel(self) -> bool:
        return self.workers >= 1


def in_process(workers: int | None, cores: int | None = None) -> bool:
    """Whether a run trains its clients in the engine's own process: ``train.workers`` = 1, one
    core, or no fork (Windows)."""
    cores = cores or available_cores()
    explicit = workers is not None and workers > 1
    return workers == 1 or (cores == 1 and not explicit) or "fork" not in multiprocessing.get_all_start_methods()


def plan(workers: int | None, threads: int | None, clients: int, cores: int | None = None) -> Plan:
    """``train.workers`` and ``train.threads`` resolved for a method whose rounds have ``clients``
    clients, on ``cores`` cores (default :func:`available_cores`). Unset workers fill the cores at
    ``threads`` each (1 if unset too), never more than the round has clients; unset threads share
    the cores between the workers. A method with one client (pooled training) gets one worker with
    every core, so that the engine's process itself never computes on several threads (see above)."""
    cores = cores or available_cores()
    if in_process(workers, cores):
        return Plan(0, threads)
    count = max(1, min(workers or cores // (threads or 1), clients))
    return Plan(count, threads or max(1, cores // count))
