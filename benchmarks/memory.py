"""Peak resident memory of training steps, one fresh process per method.

On CPU there is no allocator counter, so the process's own peak RSS (VmHWM) is reset through
``/proc/self/clear_refs`` just before the steps, and the peak minus the RSS at that moment is
the memory the steps needed (activations, gradients, optimizer moments). A fresh process per
method keeps one method's cached allocations from hiding another's.

    python -m benchmarks.memory homlora finite_difference
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak() -> int:
    return _status("VmHWM")


def measure(method: str, mode: str, steps: int = 4) -> dict[str, float]:
    from benchmarks.steps import setup
    from pf2lora.methods import build_algorithm

    prepared = setup([])
    train = dataclasses.replace(prepared.cfg.train, hypergradient=mode, local_steps=steps)
    cfg = dataclasses.replace(prepared.cfg, train=train)
    server, client, _ = build_algorithm(method, cfg, prepared.base_model(), prepared.task)
    data = prepared.data.train[0]
    state = client.init_state(0)
    _, state = client.train(0, server.configure_train(1, [0])[0], state, data)  # warm-up, state exists
    before = reset_peak()
    _, state = client.train(0, server.configure_train(2, [0])[0], state, data)
    return {"rss_before": before, "peak": peak(), "step_peak_bytes": peak() - before}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
