"""``engine=flower``: the experiment on Flower's simulation runtime, on this machine.

One virtual SuperNode per client (``partition-id`` = client id); the ServerApp runs in this process
(a thread of Flower's runtime) and writes the run directory; ClientApps run in Flower's Ray
workers, ``flower.client_cpus`` CPUs each, and keep their state in their nodes' contexts and
under the run directory (``client_state/<method>/``), exactly where the local engine's disk mode
keeps it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no network here; nothing to report home

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from pf2lora.engines.flower.client_app import app as client_app  # noqa: E402
from pf2lora.engines.flower.server import serve  # noqa: E402

log = logging.getLogger(__name__)


def run_simulation(prepared: Any, out: Path, progress: Any = None, resume: bool = False) -> dict[str, Any]:
    """Run ``prepared.cfg`` on Flower's simulation runtime (``resume``: continue the run killed in
    ``out``); returns ``results.json``."""
    from flwr.simulation import run_simulation as flower_simulation

    cfg = prepared.cfg
    results: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        results.update(serve(grid, cfg, out, progress, prepared, resume))

    cpus = os.cpu_count() or 1
    backend_config: Any = {
        "client_resources": {"num_cpus": min(cfg.flower.client_cpus, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
    }
    flower_log = logging.getLogger("flwr")
    level, flower_log.level = flower_log.level, logging.ERROR  # its INFO/DEBUG chatter and deprecation notes
    quiet = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONWARNINGS": "ignore::FutureWarning"}  # Ray workers
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update({k: v for k, v in quiet.items() if saved[k] is None})
    try:
        flower_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_config=backend_config,
        )
    finally:
        flower_log.setLevel(level)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
    if not results:
        raise RuntimeError("the Flower simulation ended without results (see its log above)")
    return results
