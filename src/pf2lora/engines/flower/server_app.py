"""The ServerApp's entry point, light: Flower and the config only.

``main`` (what ``flwr run`` starts) checks the run's config, tells every SuperNode the experiment
(:func:`.messaging.announce`), and only then imports :mod:`.server` (torch, transformers, PEFT:
about 11 s of CPU) and runs the experiment there; each site loads its model while the server
imports and prepares its own side, instead of after it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pf2lora.config import ConfigError, load_config
from pf2lora.engines.flower.messaging import announce

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point (``flwr run``): run config keys ``config`` (a YAML path on the server,
    empty for the defaults), ``overrides`` (``key=value ...``), ``out`` (the run directory) and
    ``resume`` (true: continue the run killed in ``out``, whose config must be this one)."""
    run_config = context.run_config
    path = str(run_config.get("config", "")) or None
    overrides = shlex.split(str(run_config.get("overrides", "")))
    out = Path(str(run_config.get("out", "runs/flower")))
    resume = str(run_config.get("resume", "false")).lower() == "true"
    try:
        cfg = load_config(path, overrides)
        if resume:
            from pf2lora.runner import check_resume

            check_resume(out, cfg)
    except ConfigError as error:
        raise SystemExit(f"pf2lora: {error}") from error
    sent = announce(grid, cfg, out)  # the sites start loading their models now, while this process ...
    from pf2lora.engines.flower.server import serve  # ... imports torch, transformers and PEFT

    serve(grid, cfg, out, resume=resume, announced=sent)
