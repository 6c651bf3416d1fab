"""A deployed Flower federation on loopback against the local engine, on the same small run.

The run: the default experiment cut to 3 clients, 2 rounds of 3 local steps, PF2LoRA. Timed from
the command's start to its end, as a user waits for it: ``pf2lora run`` (the local engine) and
``scripts/flower_loopback.py`` (a SuperLink, 3 SuperNodes and their sites as separate processes,
``flwr run``, every process stopped at the end; the script's defaults, so SuperNodes that ask for
work every 0.5 s), with the script's ``--sites`` modes asked for: ``shared`` (the default: one
``pf2lora site`` process for the 3 SuperNodes, which imports the libraries once and forks a task
loop per SuperNode, each loading the model once), ``fork`` (one ``pf2lora site`` per SuperNode,
each importing its own libraries, as on separate machines) and ``subprocess`` (Flower's default:
a new process per message). Each
loopback run's per-client metrics are compared with the local engine's: they agree to the last
bit at the same threads per client, and to about 1e-7 otherwise (a different summation order).

    python -m benchmarks.deployment [shared,fork,subprocess]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = ["configs/default.yaml", "data.num_clients=3", "train.rounds=2", "train.local_steps=3", "algorithms=[pf2lora]"]


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def clients(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["pf2lora"]["clients"]


def measure(sites: list[str]) -> dict:
    bin_ = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result = {"run": " ".join(RUN)}
        result["local_seconds"] = timed([str(bin_ / "pf2lora"), "run", *RUN, "--out", str(folder / "local"), "--quiet"])
        local = clients(folder / "local")
        for mode in sites:
            out, work = folder / mode, folder / f"{mode}-work"
            script = [sys.executable, "scripts/flower_loopback.py", *RUN, "--out", str(out), "--work", str(work)]
            result[f"loopback_{mode}_seconds"] = timed([*script, "--sites", mode])
            result[f"loopback_{mode}_max_metric_difference"] = max(
                abs(value - local[c][k]) for c, metrics in clients(out).items() for k, value in metrics.items()
            )
    return result


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1].split(",") if len(sys.argv) > 1 else ["shared"])))
