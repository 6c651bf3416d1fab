"""The top of the package: prepare a run and run it on its engine, from the CLI or from Python.

    import pf2lora
    cfg = pf2lora.load_config("configs/default.yaml", ["train.rounds=2", "algorithms=[pf2lora,homlora]"])
    results = pf2lora.run(cfg, "runs/mine")
    results["pf2lora"]["mean"]["accuracy"]

This module chooses the engine (the in-process one, or Flower's simulation runtime for
``engine=flower``); the runner below it (:mod:`pf2lora.runner`) runs the methods on whichever it
is handed, and the engines sit between the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pf2lora.config import ConfigError, ExperimentConfig, check_out_dir, load_config
from pf2lora.engines.local import local_engine
from pf2lora.families import PreparedRun
from pf2lora.runner import Progress, RunCallback, check_resume, prepare
from pf2lora.runner import run as run_prepared


def run_on_engine(
    prepared: PreparedRun,
    out: Path,
    progress: Progress | None = None,
    resume: bool = False,
    callbacks: Sequence[RunCallback] = (),
) -> dict[str, Any]:
    """Run a prepared experiment (from :func:`prepare`) on its engine: Flower's simulation runtime
    for ``engine=flower``, else in process. ``resume``: continue the run killed in ``out`` (checked
    first with :func:`check_resume`). ``callbacks``: followers of the local engine's rounds
    (:class:`~pf2lora.runner.RunCallback`; the trackers of ``report_to`` follow either engine).
    Returns ``results.json``."""
    if prepared.cfg.engine == "flower":
        if callbacks:
            raise ConfigError("callbacks follow runs on the local engine (engine=local)")
        from pf2lora.engines.flower.simulation import run_simulation  # Flower only where asked for

        return run_simulation(prepared, out, progress, resume)
    return run_prepared(prepared, out, local_engine, progress, resume, callbacks)


def run(
    config: ExperimentConfig | str | Path | None = None,
    out: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    force: bool = False,
    progress: Progress | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run an experiment from Python: ``config`` a config object, a YAML path or None (the
    defaults), ``overrides`` dotted ``key=value`` strings on top, ``out`` the run directory
    (default ``runs/<name>``). ``resume``: continue the run killed in ``out`` (its config must be
    this one). Every input is checked first (:class:`ConfigError` on bad input, before anything is
    written). Returns what ``results.json`` holds, method by method."""
    if isinstance(config, ExperimentConfig):
        cfg = load_config(None, list(overrides), base=config) if overrides else config
    else:
        cfg = load_config(None if config is None else str(config), list(overrides))
    folder = Path(out) if out is not None else Path("runs") / cfg.name
    if resume:
        check_resume(folder, cfg)
    else:
        check_out_dir(folder, force)
    return run_on_engine(prepare(cfg), folder, progress, resume)


__all__ = ["ConfigError", "check_out_dir", "check_resume", "prepare", "run", "run_on_engine"]
