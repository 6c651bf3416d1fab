"""The local engine with worker processes against one process, on the default experiment's round.

One fresh process per setting: the default experiment (``configs/default.yaml``: BBC News, 4
clients, 10 local steps of batch 16 at 32 tokens) with PF2LoRA, one warm-up round (it starts the
workers), then ``rounds`` timed rounds. Reported: clients trained per second, and the peak memory
of all the engine's processes together, as the sum of their proportional set sizes (PSS: a page
shared by n processes counts 1/n in each), sampled every 0.2 s. RSS summed over the processes
would count the shared base model once per worker; PSS counts it once.

    python -m benchmarks.workers 2    # 2 worker processes, the cores shared between them
    python -m benchmarks.workers 1    # one process (no workers) at every core
    python -m benchmarks.workers pool1  # one worker process at every core (the engine beside it)
    python -m benchmarks.workers ceiling pf2lora   # the most that processes side by side can gain here
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:  # the process ended
        pass
    return 0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def tree_pss(pid: int) -> int:
    """PSS of ``pid`` and every process below it."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _pss(p)
        stack += _children(p)
    return total


class PeakMemory:
    """The largest :func:`tree_pss` of this process while the ``with`` block runs."""

    def __init__(self, every: float = 0.2) -> None:
        import os

        self.pid, self.every, self.peak = os.getpid(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(workers: int | str, rounds: int = 3) -> dict[str, float]:
    """``workers``: a count (1: no workers, this process trains), or ``pool1``: one worker process
    with every core, the engine's process beside it, as a pool of one is (``train.workers=1`` itself
    trains in process: a pool of one only adds the engine's process)."""
    import torch

    from pf2lora.config import load_config
    from pf2lora.engines.local import LocalEngine
    from pf2lora.parallelism import Plan, available_cores, plan
    from pf2lora.runner import prepare

    count = 2 if workers == "pool1" else int(workers)  # pool1: prepared as for a pool (one thread here)
    cfg = load_config("configs/default.yaml", ["algorithms=[pf2lora]", f"train.workers={count}"])
    prepared = prepare(cfg)  # one thread here where workers will be forked
    cores = available_cores()
    spread = plan(cfg.train.workers, cfg.train.threads, cfg.data.num_clients, cores)
    if workers == "pool1":
        spread = Plan(1, cores)
    if not spread.parallel:
        torch.set_num_threads(cores)  # one process: every core
    built = prepared.build("pf2lora", cfg)
    data = prepared.data
    engine = LocalEngine(built.server, built.client, data.train, data.test, workers=spread)
    with engine:
        started = time.perf_counter()
        engine.train_round(1)  # warm-up: starts the workers, first allocations
        warm_up = time.perf_counter() - started
        with PeakMemory() as memory:
            started = time.perf_counter()
            for r in range(2, rounds + 2):
                engine.train_round(r)
            seconds = time.perf_counter() - started
    trained = rounds * cfg.data.num_clients
    return {
        "workers": spread.workers,
        "threads_per_worker": spread.threads or cores,
        "cores": cores,
        "warm_up_round_seconds": warm_up,
        "seconds_per_round": seconds / rounds,
        "clients_per_second": trained / seconds,
        "peak_pss_bytes": memory.peak,
    }


def client_seconds(method: str, threads: int) -> float:
    """Seconds one client of the default experiment takes to train one round (its 10 local steps),
    in this process at ``threads`` threads: the mean of two rounds after a warm-up round."""
    import torch

    from pf2lora.config import load_config
    from pf2lora.engines.local import LocalEngine
    from pf2lora.runner import prepare

    cfg = load_config("configs/default.yaml", [f"algorithms=[{method}]", "train.workers=1"])
    prepared = prepare(cfg)
    torch.set_num_threads(threads)
    built = prepared.build(method, cfg)
    engine = LocalEngine(built.server, built.client, prepared.data.train, prepared.data.test)
    sent = built.server.configure_train(1, [0, 1])
    built.client.train(1, sent[1], engine.state(1), prepared.data.train[1])  # warm-up
    started = time.perf_counter()
    for _ in range(2):
        built.client.train(0, sent[0], engine.state(0), prepared.data.train[0])
    return (time.perf_counter() - started) / 2


def ceiling(method: str) -> dict[str, float]:
    """What processes side by side can gain on this machine, without our pool: one client's round
    alone at every core, alone at one thread, and at one thread in two independent processes at
    once. The pool's clients per second can at best be ``2 x alone / side by side`` of one process's."""
    import os
    import subprocess

    def run(threads: int, copies: int) -> list[float]:
        command = [sys.executable, "-m", "benchmarks.workers", "client", method, str(threads)]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
        return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]

    cores = len(os.sched_getaffinity(0))
    alone = run(cores, 1)[0]
    one_thread = run(1, 1)[0]
    side_by_side = run(1, cores)
    mean = sum(side_by_side) / len(side_by_side)
    return {
        "method": method,
        "cores": cores,
        "seconds_alone_all_cores": alone,
        "seconds_alone_one_thread": one_thread,
        "seconds_side_by_side_one_thread": mean,
        "thread_scaling": one_thread / alone,
        "process_ceiling": cores * alone / mean,
    }


if __name__ == "__main__":
    if sys.argv[1] == "client":  # client METHOD THREADS: one client's round, in this process
        print(client_seconds(sys.argv[2], int(sys.argv[3])))
    elif sys.argv[1] == "ceiling":  # ceiling [METHOD]
        print(json.dumps(ceiling(sys.argv[2] if len(sys.argv) > 2 else "pf2lora")))
    else:
        print(json.dumps(measure(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)))
