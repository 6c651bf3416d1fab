"""``pf2lora compare``: the paper's comparison tables (Tables 1 and 16) on any config.

Every row (a method, or a method with overrides: an ablation or one value of a sweep) runs on the
same client partitions in every column (a dataset and heterogeneity level), once per seed. A cell
is the mean over clients of the chosen metric, each client on its own test split; the table shows
its mean +- std over seeds, with the trainable and communicated parameters of each row (the
paper's Tables 7 and 22 columns). Each run is an ordinary run directory under ``<out>/runs``; the
table is written as Markdown, CSV and JSON, with a PNG plot.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pf2lora.config import ConfigError, ExperimentConfig, check_out_dir, from_dict, load_config
from pf2lora.methods import check, get
from pf2lora.metrics import VALIDATION_PREFIX
from pf2lora.runner import check_resume
from pf2lora.tasks import task_class

ABLATIONS = {"bilevel": ("pf2lora", ["train.hypergradient=joint"])}


@dataclass(frozen=True)
class Row:
    """One table row: a method with optional config overrides."""

    algorithm: str
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.algorithm + (f" ({', '.join(self.overrides)})" if self.overrides else "")

    @property
    def slug(self) -> str:
        return _slug(self.label)


@dataclass(frozen=True)
class Column:
    """One table column: a dataset at one heterogeneity level."""

    dataset: str
    heterogeneity: float
    label: str
    setting: str | None = None  # the partition, when it is not by heterogeneity level

    @property
    def slug(self) -> str:
        return _slug(f"{self.dataset}-{self.setting or f'h{self.heterogeneity:g}'}")


@dataclass
class Plan:
    rows: list[Row]
    columns: list[Column]
    seeds: list[int]
    metric: str
    baseline: str | None = None
    runs: list[tuple[Row, Column, int, ExperimentConfig]] = field(default_factory=list)
    at_round: int | None = None  # the table from every run's evaluation after this round (None: the final one)


def _slug(text: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in text)
    return "_".join(part for part in keep.split("_") if part)


def _as_list(raw: str) -> list[Any]:
    value = yaml.safe_load(raw)
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return [yaml.safe_load(v.strip()) for v in value.split(",") if v.strip()]
    return [value]


def plan(
    config: str | None,
    items: list[str],
    sweeps: list[str] | None = None,
    variants: list[str] | None = None,
    ablations: list[str] | None = None,
    metric: str | None = None,
    baseline: str | None = None,
    at_round: int | None = None,
    split: str = "test",
) -> Plan:
    """Resolve the grid and validate every run's config before anything runs (ConfigError on bad input).

    ``metric``: what the table shows (default: the task's primary metric); ``split``: from the
    clients' test splits or their validation splits (``data.validation_fraction``). ``at_round``: the table
    from each run's evaluation after that round (one its ``train.eval_every`` evaluates), not its
    final one: a learning curve, paired by seed, from the same runs.
    ``items``: ``key=value`` overrides, where ``algorithms=``, ``heterogeneity=``, ``seeds=`` and
    ``datasets=`` take comma-separated lists (the axes of the grid). ``sweeps``: ``KEY=V1,V2,...``,
    one row per algorithm and value (several sweeps: every combination). ``variants``: ``"ALGORITHM
    key=value ..."``, one extra row each. ``ablations``: names in :data:`ABLATIONS`. ``baseline``: a
    row's label; every other row is also compared with it seed by seed (paired differences).

    The rows are either LoRA methods or the model-heterogeneous ones (pFedLoRA, local-only, FedAvg
    of whole models), whose data and models differ from the LoRA methods'.
    """
    axes: dict[str, list[Any]] = {}
    overrides: list[str] = []
    for item in items:
        key, _, raw = item.partition("=")
        if not _ or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = key.strip()
        if key in ("algorithms", "algorithm", "heterogeneity", "data.heterogeneity", "seeds", "datasets", "dataset"):
            axis = {"algorithm": "algorithms", "data.heterogeneity": "heterogeneity", "dataset": "datasets"}.get(
                key, key
            )
            axes[axis] = _as_list(raw)
        else:
            overrides.append(item)
    cfg = load_config(config, overrides)
    task = task_class(cfg.task.name)
    metric = metric or task.primary
    if metric not in task.metrics:
        raise ConfigError(f"unknown metric {metric!r} for task {task.name} (choose from {', '.join(task.metrics)})")
    if split not in ("test", "validation"):
        raise ConfigError(f"--split must be test or validation, got {split!r}")
    if split == "validation":  # each run's validation metric, from the split it holds out of training
        if cfg.data.validation_fraction <= 0:
            raise ConfigError("--split validation needs data.validation_fraction > 0 (each client's held-out split)")
        metric = VALIDATION_PREFIX + metric
    elif not cfg.data.evaluate_test:
        raise ConfigError("data.evaluate_test=false leaves no test metrics for the table: use --split validation")
    algorithms = [str(a) for a in axes.get("algorithms", cfg.algorithms)]
    levels = axes.get("heterogeneity", [cfg.data.heterogeneity])
    seeds = axes.get("seeds", [cfg.seed])
    datasets = [str(d) for d in axes.get("datasets", [cfg.data.dataset])]
    for name, values in (
        ("algorithms", algorithms),
        ("heterogeneity", levels),
        ("seeds", seeds),
        ("datasets", datasets),
    ):
        if not values:
            raise ConfigError(f"{name}: give at least one value")
    for s in seeds:
        if not isinstance(s, int) or isinstance(s, bool):
            raise ConfigError(f"seeds: expected integers, got {s!r}")
    for h in levels:
        if not isinstance(h, (int, float)) or isinstance(h, bool):
            raise ConfigError(f"heterogeneity: expected numbers, got {h!r}")
    if len(levels) > 1 and cfg.data.partition != "heterogeneity":
        raise ConfigError(f"several heterogeneity levels need data.partition=heterogeneity, not {cfg.data.partition}")

    rows = [Row(a) for a in algorithms]
    sweep_axes = []
    for sweep in sweeps or []:
        key, _, raw = sweep.partition("=")
        if not _ or not key.strip() or not raw.strip():
            raise ConfigError(f"--sweep {sweep!r} is not of the form KEY=V1,V2,...")
        sweep_axes.append([f"{key.strip()}={v}" for v in _as_list(raw)])
    if sweep_axes:
        rows = [Row(a, tuple(combo)) for a in algorithms for combo in itertools.product(*sweep_axes)]
    for name in ablations or []:
        if name not in ABLATIONS:
            raise ConfigError(f"unknown ablation {name!r} (choose from {', '.join(ABLATIONS)})")
        algorithm, extra = ABLATIONS[name]
        rows.append(Row(algorithm, tuple(extra)))
    for variant in variants or []:
        parts = variant.split()
        if not parts or "=" in parts[0]:
            raise ConfigError(f"--variant {variant!r} must be 'ALGORITHM key=value ...'")
        rows.append(Row(parts[0], tuple(parts[1:])))
    rows = list(dict.fromkeys(rows))  # no duplicate rows
    families = {r.algorithm: get(r.algorithm).family for r in rows}  # an unknown name: the known ones listed
    if len(set(families.values())) > 1:
        hetero = sorted(a for a, f in families.items() if f == "heterogeneous")
        lora = sorted(a for a, f in families.items() if f != "heterogeneous")
        raise ConfigError(
            "compare runs either LoRA methods or model-heterogeneous ones "
            f"in one table, not both: {', '.join(hetero)} with {', '.join(lora)}"
        )
    if baseline is not None and baseline not in [r.label for r in rows]:
        raise ConfigError(f"--baseline {baseline!r} is not a row (rows: {', '.join(r.label for r in rows)})")

    many = len(datasets) > 1
    setting = _partition_label(cfg)
    columns = [
        Column(d, float(h), f"{d} {setting or f'h={float(h):g}'}" if many else setting or f"h={float(h):g}", setting)
        for d in datasets
        for h in levels
    ]
    result = Plan(rows, columns, [int(s) for s in seeds], metric, baseline, at_round=at_round)
    for column, seed, row in itertools.product(columns, result.seeds, rows):
        run_overrides = [
            *overrides,
            f"data.dataset={column.dataset}",
            f"data.heterogeneity={column.heterogeneity}",
            f"seed={seed}",
            *row.overrides,
        ]
        run_cfg = load_config(config, run_overrides)
        run_cfg.algorithms = [row.algorithm]
        check(run_cfg)
        if at_round is not None and not _evaluated(run_cfg, at_round):
            t = run_cfg.train
            raise ConfigError(
                f"--round {at_round}: {row.label} is evaluated after rounds "
                f"{', '.join(map(str, _evaluations(t.rounds, t.eval_every)))} only "
                f"(train.rounds={t.rounds}, train.eval_every={t.eval_every})"
            )
        result.runs.append((row, column, seed, run_cfg))
    return result


def _evaluations(rounds: int, eval_every: int) -> list[int]:
    """The rounds after which a run evaluates its clients (:func:`pf2lora.rounds.run_rounds`)."""
    return sorted({r for r in range(1, rounds + 1) if eval_every and r % eval_every == 0} | {rounds})


def _evaluated(cfg: ExperimentConfig, server_round: int) -> bool:
    return server_round in _evaluations(cfg.train.rounds, cfg.train.eval_every)


def _results_at(folder: Path, server_round: int) -> dict[str, Any]:
    """A finished run's per-client metrics and their mean after ``server_round``, from its
    ``metrics.jsonl`` (the last record of that round: a resumed run may have repeated it)."""
    from pf2lora.metrics import summarize

    found = None
    with open(folder / "metrics.jsonl") as lines:
        for line in lines:
            record = json.loads(line)
            if record.get("round") == server_round and "eval" in record:
                found = record["eval"]
    if found is None:
        raise ConfigError(f"{folder} has no evaluation after round {server_round} in its metrics.jsonl")
    clients = {int(cid): metrics for cid, metrics in found.items()}
    return {"clients": found, "mean": summarize(clients)[0]}


def _partition_label(cfg: ExperimentConfig) -> str | None:
    """A column's name when the clients are not split by heterogeneity level (None when they are)."""
    d = cfg.data
    return {
        "heterogeneity": None,
        "classes": f"{d.classes_per_client} classes per client",
        "dirichlet": f"Dirichlet alpha={d.dirichlet_alpha:g}",
    }.get(d.partition, d.partition)


def run_dir(out: Path, row: Row, column: Column, seed: int) -> Path:
    return out / "runs" / f"{column.slug}-seed{seed}" / row.slug


def data_key(cfg: ExperimentConfig) -> str:
    """Runs whose data and model settings agree share one tokenised, partitioned dataset."""
    return json.dumps([cfg.seed, cfg.task.__dict__, cfg.data.__dict__, cfg.model.__dict__], sort_keys=True, default=str)


def execute(
    grid: Plan,
    out: Path,
    resume: bool = False,
    on_run: Callable[[int, int, str], None] | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Prepare every distinct dataset first (all bad input surfaces before training), then run the
    grid, skipping finished runs when ``resume``. Writes and returns the table.

    ``jobs`` > 1 runs that many runs at once, each in its own process (a run is seeded by its config
    alone, so it gives the same result in any process; a run without ``train.threads`` gets
    ``cores // jobs`` threads). On the 2-core machine two 1-thread runs side by side finished HOMLoRA
    runs ~1.1x faster than one 2-thread run at a time (115-123 s each against 63 s alone)."""
    if jobs > 1:  # a worker process starts afresh: it knows the methods the package registers, no others
        own = sorted(
            {c.algorithms[0] for *_, c in grid.runs if not get(c.algorithms[0]).build.__module__.startswith("pf2lora.")}
        )
        if own:
            raise ConfigError(
                f"{', '.join(own)}: methods registered from your own code run in this process only; use jobs=1"
            )
    from pf2lora.api import prepare, run_on_engine

    # one preparation per dataset: its data (and the task bound to it) is shared by every run on it;
    # models are loaded again for each run, and each run's own models (pFedLoRA's) checked here
    data: dict[str, Any] = {}

    def prepared_for(cfg: ExperimentConfig) -> Any:
        return prepare(cfg, reuse=data[data_key(cfg)])

    for row, column, seed, cfg in grid.runs:
        if resume and _finished(run_dir(out, row, column, seed), cfg):
            continue  # kept as it is: nothing to prepare
        if data_key(cfg) not in data:
            data[data_key(cfg)] = prepare(cfg).release()  # the data, and this run's model checked on it
        elif get(cfg.algorithms[0]).family == "heterogeneous":
            prepared_for(cfg)  # each run's own models checked on its clients' data before any training
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    todo = []
    for i, (row, column, seed, cfg) in enumerate(grid.runs):
        folder = run_dir(out, row, column, seed)
        what = f"{row.label} | {column.label} | seed {seed}"
        if resume and _finished(folder, cfg):
            if on_run is not None:
                on_run(i, len(grid.runs), f"{what} (kept)")
            continue
        half_done = resume and _resumable(folder, cfg)
        if folder.exists() and not half_done:
            for stale in sorted(folder.rglob("*"), reverse=True):
                stale.unlink() if stale.is_file() else stale.rmdir()
        todo.append((i, f"{what} (resumed)" if half_done else what, cfg, folder, half_done))
    from pf2lora.trackers import publish, shared_store

    base = grid.runs[0][3]
    with shared_store(base, out):  # every run, and the table, in one MLflow store where mlflow is named
        if jobs > 1 and len(todo) > 1:
            _execute_parallel(todo, len(grid.runs), jobs, on_run)
        else:
            for i, what, cfg, folder, half_done in todo:
                if on_run is not None:
                    on_run(i, len(grid.runs), what)
                # on Flower's simulation runtime for engine=flower; a half-done run from its last complete round
                run_on_engine(prepared_for(cfg), folder, progress, resume=half_done)
        table = build_table(grid, out)
        table["seconds"] = round(time.perf_counter() - started, 1)
        write_table(table, out)
        if base.report_to:  # every run was logged as it ran; the table too, as a tracker run of its own
            files = [out / f"table.{kind}" for kind in ("md", "csv", "json")]
            publish(base, out, "compare", [*files, out / "compare.png"])
    return table


def run(
    config: str | Path | None = None,
    items: list[str] | tuple[str, ...] = (),
    out: str | Path = "runs/compare",
    *,
    sweeps: list[str] | tuple[str, ...] = (),
    variants: list[str] | tuple[str, ...] = (),
    ablations: list[str] | tuple[str, ...] = (),
    metric: str | None = None,
    baseline: str | None = None,
    jobs: int = 1,
    resume: bool = False,
    force: bool = False,
    at_round: int | None = None,
) -> dict[str, Any]:
    """A comparison from Python, the one ``pf2lora compare CONFIG ITEMS ...`` makes: ``items`` are
    its ``key=value`` arguments (``algorithms=a,b``, ``seeds=0,1``, overrides), the keywords its
    options. Every input is checked before any training. Writes ``out`` and returns the table."""
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    grid = plan(
        None if config is None else str(config),
        list(items),
        list(sweeps),
        list(variants),
        list(ablations),
        metric,
        baseline,
        at_round,
    )
    folder = Path(out)
    if not resume:
        check_out_dir(folder, force)
    return execute(grid, folder, resume, jobs=jobs)


def _execute_parallel(
    todo: list[tuple[int, str, ExperimentConfig, Path, bool]],
    total: int,
    jobs: int,
    on_run: Callable[[int, int, str], None] | None,
) -> None:
    """Run ``todo`` in ``jobs`` worker processes (spawned: no torch state is inherited); the first
    failure cancels the runs not yet started and is raised once the running ones end."""
    import multiprocessing
    import os
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {}
        for i, what, cfg, folder, half_done in todo:
            futures[pool.submit(_run_in_worker, cfg.to_dict(), str(folder), threads, half_done)] = (i, what)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                error = future.exception()
                if error is not None:
                    for other in pending:
                        other.cancel()
                    raise error
                if on_run is not None:
                    i, what = futures[future]
                    on_run(i, total, f"{what} ({future.result():.0f}s)")


def _run_in_worker(cfg_dict: dict[str, Any], folder: str, threads: int, resume: bool = False) -> float:
    """One run of the grid in a worker process (``resume``: a half-done one, continued); returns its seconds."""
    import os
    import warnings

    import torch

    from pf2lora.config import from_dict
    from pf2lora.parallelism import CORES_ENV

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # as the CLI does
    from pf2lora.api import prepare, run_on_engine

    started = time.perf_counter()
    os.environ[CORES_ENV] = str(threads)  # this run's share of the cores (its local engine's workers)
    cfg = from_dict(ExperimentConfig, cfg_dict).validate()
    if not cfg.train.threads:
        torch.set_num_threads(threads)
    run_on_engine(prepare(cfg), Path(folder), resume=resume)
    return time.perf_counter() - started


def _finished(folder: Path, cfg: ExperimentConfig) -> bool:
    try:
        # read back through the dataclasses: a run written before a field existed has its default
        written = from_dict(ExperimentConfig, yaml.safe_load((folder / "config.yaml").read_text()))
        done = written.to_dict() == cfg.to_dict()
        return done and (folder / "results.json").is_file()
    except (OSError, yaml.YAMLError, ConfigError):
        return False


def _resumable(folder: Path, cfg: ExperimentConfig) -> bool:
    """Whether ``folder`` holds this run, killed part way with a round or a method to go on from."""
    try:
        check_resume(folder, cfg)
    except ConfigError:
        return False
    return (folder / "resume").is_dir()


def build_table(grid: Plan, out: Path) -> dict[str, Any]:
    """Collect every run's results.json into the table (rows x columns, mean +- std over seeds)."""
    rows = []
    for row in grid.rows:
        cells, trainable, communicated = {}, [], []
        for column in grid.columns:
            per_seed, per_client = [], {}
            for seed in grid.seeds:
                folder = run_dir(out, row, column, seed)
                results = json.loads((folder / "results.json").read_text())
                r = results[row.algorithm]
                if grid.at_round is not None:
                    r = {**r, **_results_at(folder, grid.at_round)}
                per_seed.append(r["mean"][grid.metric])
                for cid, metrics in r["clients"].items():
                    per_client.setdefault(cid, []).append(metrics[grid.metric])
                trainable.append(r["trainable_parameters"])
                communicated.append(r["communicated_parameters_per_client_round"])
            cells[column.label] = {
                "mean": float(np.mean(per_seed)),
                "std": float(np.std(per_seed)),
                "seeds": per_seed,
                "clients": {cid: float(np.mean(v)) for cid, v in sorted(per_client.items(), key=lambda kv: int(kv[0]))},
            }
        rows.append(
            {
                "method": row.label,
                "algorithm": row.algorithm,
                "overrides": list(row.overrides),
                "trainable_parameters": round(float(np.mean(trainable))),
                "communicated_parameters_per_client_round": (
                    None if any(c is None for c in communicated) else round(float(np.mean(communicated)))
                ),
                "cells": cells,
            }
        )
    if grid.baseline is not None:
        base = next(r for r in rows if r["method"] == grid.baseline)
        for r in rows:
            if r is not base:
                for column, cell in r["cells"].items():
                    cell["vs_baseline"] = paired(cell["seeds"], base["cells"][column]["seeds"])
    return {
        "metric": grid.metric,
        "round": grid.at_round,
        "columns": [c.label for c in grid.columns],
        "seeds": grid.seeds,
        "baseline": grid.baseline,
        "rows": rows,
    }


def paired(values: list[float], baseline: list[float]) -> dict[str, Any]:
    """A row against the baseline on the same seeds (same partitions): the per-seed differences,
    their mean and std, a 95% confidence interval for the mean (Student's t over the seeds), and how
    many seeds it wins, ties and loses."""
    from scipy import stats

    diff = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    n = len(diff)
    half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    return {
        "differences": diff.tolist(),
        "mean": float(diff.mean()),
        "std": float(diff.std()),
        "ci95": None if half is None else [float(diff.mean()) - half, float(diff.mean()) + half],  # one seed: none
        "wins": int((diff > 1e-12).sum()),
        "ties": int((np.abs(diff) <= 1e-12).sum()),
        "losses": int((diff < -1e-12).sum()),
    }


def _params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def markdown(table: dict[str, Any]) -> str:
    columns = table["columns"]
    header = ["Method", "Trainable params", "Comm. params / client / round", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    best = {c: max(r["cells"][c]["mean"] for r in table["rows"]) for c in columns}
    for r in table["rows"]:
        cells = []
        for c in columns:
            cell = r["cells"][c]
            text = f"{100 * cell['mean']:.2f} ± {100 * cell['std']:.2f}"
            cells.append(f"**{text}**" if math.isclose(cell["mean"], best[c]) else text)
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    _params(r["trainable_parameters"]),
                    _params(r["communicated_parameters_per_client_round"]),
                    *cells,
                ]
            )
            + " |"
        )
    seeds = ", ".join(str(s) for s in table["seeds"])
    lines.append("")
    lines.append(
        f"{table['metric']} (x100){_after(table)}, mean over clients (each on its own "
        f"{'validation' if table['metric'].startswith(VALIDATION_PREFIX) else 'test'} split), "
        f"mean ± std over seeds {seeds}; "
        "best per column in bold. Communicated: parameters sent plus received per client per round."
    )
    if table.get("baseline"):
        lines += ["", "| Against " + table["baseline"] + " | " + " | ".join(columns) + " |"]
        lines.append("|" + "|".join(["---"] + ["---:"] * len(columns)) + "|")
        for r in table["rows"]:
            if r["method"] != table["baseline"]:
                cells = [_paired_cell(r["cells"][c]["vs_baseline"]) for c in columns]
                lines.append("| " + " | ".join([r["method"], *cells]) + " |")
        lines.append("")
        lines.append(
            f"Paired by seed (same partitions): the row minus {table['baseline']}, x100, mean ± std over seeds, "
            "[95% confidence interval of the mean], seeds won / tied / lost."
        )
    return "\n".join(lines) + "\n"


def _after(table: dict[str, Any]) -> str:
    return "" if table.get("round") is None else f" after round {table['round']}"


def _paired_cell(p: dict[str, Any]) -> str:
    ci = "" if p["ci95"] is None else f" [{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}]"
    return f"{100 * p['mean']:+.2f} ± {100 * p['std']:.2f}{ci}, {p['wins']}/{p['ties']}/{p['losses']}"


def write_table(table: dict[str, Any], out: Path) -> None:
    (out / "table.json").write_text(json.dumps(table, indent=2))
    (out / "table.md").write_text(markdown(table))
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        columns = table["columns"]
        writer.writerow(
            ["method", "trainable_parameters", "communicated_parameters_per_client_round"]
            + [f"{c} {k}" for c in columns for k in ("mean", "std")]
        )
        for r in table["rows"]:
            comm = r["communicated_parameters_per_client_round"]
            values = [f"{r['cells'][c][k]:.6f}" for c in columns for k in ("mean", "std")]
            writer.writerow([r["method"], r["trainable_parameters"], "" if comm is None else comm, *values])
    from pf2lora.plots import plot_compare

    plot_compare(table, out / "compare.png")
