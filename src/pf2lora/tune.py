"""``pf2lora tune``: hyperparameters chosen on validation data with Optuna, never on the test split.

For each method, one Optuna study searches the named keys (by default ``train.lr``) by maximising
a validation metric: every trial is an ordinary run of that one method with
``data.validation_fraction`` of each client's training data held out and ``data.evaluate_test``
false, so the clients are evaluated on their validation split only and the test split's examples
are never encoded nor shown to a model. Trials report the per-round validation curve and Optuna's
pruner stops the unpromising ones (``train.eval_every``, 1 unless set). Every method's study lives
in one SQLite file (Optuna's RDB storage): ``--resume`` continues it (trials left running by a
killed process are failed and their values tried again; finished trials are never repeated), and
``--jobs N`` runs N processes that draw trials from the same studies side by side. The output is
``best.yaml``, the best values per method as a ``per_method`` block (paste it into a config, or
``pf2lora compare ... --per-method best.yaml``), ``trials.json`` and, per method, Optuna's plots.

Tuning picks the values; paired seeds (``pf2lora compare --baseline``) then compare the methods at them.

Search specifications (``--search KEY=SPEC``, ``KEY`` any config key, optionally ``METHOD/KEY`` for
one method only): ``log:LOW:HIGH`` (log-uniform), ``LOW:HIGH`` (uniform), ``int:LOW:HIGH``, or
``V1,V2,...`` (a choice). When every key is a choice, the grid is searched exhaustively.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pf2lora.config import (
    PER_METHOD_SECTIONS,
    ConfigError,
    ExperimentConfig,
    apply_override,
    check_out_dir,
    from_dict,
    load_config,
)
from pf2lora.methods import check, get
from pf2lora.metrics import VALIDATION_PREFIX
from pf2lora.tasks import task_class

DEFAULT_SEARCH = ("train.lr=log:1e-4:1e-2",)
DEFAULT_VALIDATION = 0.2
PRUNERS = ("median", "none")
SAMPLERS = ("auto", "tpe", "random", "grid")
STORAGE = "study.db"


@dataclass(frozen=True)
class Space:
    """One searched key: its range (``kind`` log | float | int) or its choices."""

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple[Any, ...] = ()
    method: str | None = None  # searched for this method only

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.key} {self.kind} [{self.low:g}, {self.high:g}]"


def parse_space(spec: str) -> Space:
    """``[METHOD/]KEY=SPEC`` (see the module docstring); ConfigError on a malformed or empty range."""
    key, sep, raw = spec.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise ConfigError(f"--search {spec!r} is not of the form KEY=SPEC (e.g. train.lr=log:1e-4:1e-2)")
    method = None
    if "/" in key:
        method, key = (part.strip() for part in key.split("/", 1))
    parts = raw.split(":")
    if len(parts) == 3 and parts[0] in ("log", "int", "float"):
        kind, low_raw, high_raw = parts
    elif len(parts) == 2:
        kind, (low_raw, high_raw) = "float", parts
    elif ":" in raw:
        raise ConfigError(f"--search {spec!r}: a range is LOW:HIGH, log:LOW:HIGH or int:LOW:HIGH")
    else:
        choices = tuple(_value(v.strip()) for v in raw.split(",") if v.strip())
        if not choices:
            raise ConfigError(f"--search {spec!r}: no values to choose from")
        if len(set(map(str, choices))) < len(choices):
            raise ConfigError(f"--search {spec!r}: a value is given twice")
        return Space(key, "choice", choices=choices, method=method)
    try:
        low, high = float(low_raw), float(high_raw)
    except ValueError:
        raise ConfigError(f"--search {spec!r}: {low_raw!r} and {high_raw!r} must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"--search {spec!r}: the range is empty (LOW must be below HIGH)")
    if kind == "log" and low <= 0:
        raise ConfigError(f"--search {spec!r}: a log range needs LOW > 0")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ConfigError(f"--search {spec!r}: an int range needs whole numbers")
    return Space(key, kind, low, high, method=method)


def _value(raw: str) -> Any:
    """A listed value as YAML reads it, and a number where YAML 1.1 leaves ``1e-3`` a string."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class Study:
    """A tuning plan: the base overrides, the methods, each method's search space, the budget."""

    config: str | None
    overrides: list[str]
    methods: list[str]
    spaces: dict[str, list[Space]]
    trials: int
    metric: str  # the task's metric name; the objective is its val_ form
    sampler: str
    pruner: str
    seed: int
    base: ExperimentConfig
    notes: list[str] = field(default_factory=list)

    @property
    def objective(self) -> str:
        return VALIDATION_PREFIX + self.metric

    def trial_config(self, method: str, values: dict[str, Any]) -> ExperimentConfig:
        """The run of one trial: the base config, ``method`` alone, evaluated on validation only,
        with ``values`` set as the method's own (``per_method``: above what the config sets for it)."""
        tried = [f"per_method.{method}.{k}={_yaml(v)}" for k, v in values.items()]
        return load_config(self.config, [*self.overrides, f"algorithms=[{method}]", *tried])


def _yaml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def plan(
    config: str | None,
    overrides: list[str],
    methods: list[str] | None = None,
    searches: list[str] | None = None,
    trials: int | None = None,
    metric: str | None = None,
    sampler: str = "auto",
    pruner: str = "median",
) -> Study:
    """Resolve and check a tuning plan before any training (ConfigError on bad input): every key
    searched is a config key whose every value in range makes a valid config for every method."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    notes = []
    base = load_config(config, overrides)
    extra = []
    if base.data.validation_fraction <= 0:
        extra.append(f"data.validation_fraction={DEFAULT_VALIDATION}")
        notes.append(f"data.validation_fraction={DEFAULT_VALIDATION} (none was set)")
    extra.append("data.evaluate_test=false")
    if base.train.eval_every == 0:
        extra.append("train.eval_every=1")
        notes.append("train.eval_every=1: a validation point every round for the pruner")
    if base.engine != "local":
        raise ConfigError(
            "pf2lora tune runs its trials on the local engine (engine=local): the same results as Flower's"
        )
    if base.report_to:
        notes.append(f"every trial reports to {', '.join(base.report_to)}")
    overrides = [*overrides, *extra]
    base = load_config(config, overrides)
    methods = list(methods or base.algorithms)
    if not methods:
        raise ConfigError("--methods: give at least one method")
    for name in methods:
        get(name)  # an unknown name: the known ones listed
    task = task_class(base.task.name)
    metric = metric or task.primary
    if metric.startswith(VALIDATION_PREFIX):
        metric = metric[len(VALIDATION_PREFIX) :]
    if metric not in task.metrics:
        raise ConfigError(f"unknown metric {metric!r} for task {task.name} (choose from {', '.join(task.metrics)})")
    found = [parse_space(s) for s in (searches or DEFAULT_SEARCH)]
    for space in found:
        section = space.key.split(".")[0]
        if "." not in space.key or section not in PER_METHOD_SECTIONS:
            raise ConfigError(
                f"--search {space.key}: tune searches a method's own settings, a dotted key in "
                f"{', '.join(PER_METHOD_SECTIONS)} (e.g. train.lr, train.lower_lr, lora.personal_rank)"
            )
    keys = [(s.method, s.key) for s in found]
    if len(set(keys)) < len(keys):
        raise ConfigError("--search: a key is searched twice")
    for space in found:
        if space.method is not None and space.method not in methods:
            raise ConfigError(f"--search {space.method}/{space.key}: {space.method} is not tuned here")
    spaces = {m: [s for s in found if s.method in (None, m)] for m in methods}
    for name, space_list in spaces.items():
        if not space_list:
            raise ConfigError(f"--search names nothing to search for {name}")
    study = Study(config, overrides, methods, spaces, trials or 0, metric, sampler, pruner, base.seed, base, notes)
    for name, space_list in spaces.items():
        for corner in _corners(space_list):  # every key known, every end of every range valid
            values = dict(zip([s.key for s in space_list], corner, strict=True))
            try:
                check(study.trial_config(name, values))
            except ConfigError as err:
                raise ConfigError(f"--search for {name}: {err}") from None
    grid = sampler == "grid" or (sampler == "auto" and all(s.kind == "choice" for sl in spaces.values() for s in sl))
    if sampler == "grid" and not grid:
        raise ConfigError("--sampler grid needs every --search to be a list of values")
    study.sampler = "grid" if grid else ("tpe" if sampler == "auto" else sampler)
    if study.sampler == "grid":
        size = max(math.prod(len(s.choices) for s in sl) for sl in spaces.values())
        study.trials = trials or size
    else:
        study.trials = trials or 10
    return study


def _corners(spaces: list[Space]) -> list[tuple[Any, ...]]:
    ends = [list(s.choices) if s.kind == "choice" else _ends(s) for s in spaces]
    return list(itertools.product(*ends))


def _ends(space: Space) -> list[Any]:
    if space.kind == "int":
        return [int(space.low), int(space.high)]
    return [space.low, space.high]


# --------------------------------------------------------------------------- running


def _storage(out: Path) -> Any:
    import optuna

    url = f"sqlite:///{(out / STORAGE).absolute()}"
    # processes of --jobs write to one file: wait for its lock instead of failing at once
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})


def _sampler(study: Study, method: str, worker: int) -> Any:
    import optuna

    if study.sampler == "grid":
        return optuna.samplers.GridSampler({s.key: list(s.choices) for s in study.spaces[method]}, seed=study.seed)
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=study.seed + worker)
    return optuna.samplers.TPESampler(seed=study.seed + worker, n_startup_trials=min(5, max(2, study.trials // 3)))


def _pruner(study: Study) -> Any:
    import optuna

    if study.pruner == "none":
        return optuna.pruners.NopPruner()
    # no trial stopped before half its rounds: a federated curve swings early (FedAvg's global model
    # between the clients' labels), and a first run of this tuner pruned at round 2 and 4 of 8 on
    # 8 of 10 trials (docs/results/tuning_default.md)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, study.base.train.rounds // 2))


def _load(study: Study, method: str, out: Path, worker: int = 0) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=method,
        storage=_storage(out),
        sampler=_sampler(study, method, worker),
        pruner=_pruner(study),
        direction="maximize",
        load_if_exists=True,
    )


def _finished(opt_study: Any) -> int:
    from optuna.trial import TrialState

    return len(opt_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def recover(study: Study, out: Path) -> list[int]:
    """A resumed study: every trial a killed process left running is failed and its values queued
    to be tried again. Returns the failed trials' numbers."""
    from optuna.trial import TrialState

    recovered = []
    for method in study.methods:
        opt_study = _load(study, method, out)
        for trial in opt_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            opt_study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            if trial.params:
                opt_study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            recovered.append(trial.number)
    return recovered


class Pruning:
    """A trial's follower (:class:`~pf2lora.runner.RunCallback`): each round's mean validation
    metric reported to Optuna, the trial stopped where the pruner says so."""

    def __init__(self, trial: Any, objective: str, rounds: int) -> None:
        self.trial, self.objective, self.rounds = trial, objective, rounds

    def on_round(self, method: str, record: dict[str, Any]) -> None:
        import optuna

        values = [m[self.objective] for m in (record.get("eval") or {}).values() if self.objective in m]
        if not values:
            return
        value = sum(values) / len(values)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.objective} is {value} after round {record['round']}")
        self.trial.report(value, int(record["round"]))
        if record["round"] < self.rounds and self.trial.should_prune():  # a finished trial is complete
            raise optuna.TrialPruned(f"{self.objective} {value:.4f} after round {record['round']}")

    def on_method(self, method: str, result: dict[str, Any]) -> None:
        pass

    def on_end(self, out: Path, results: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def prepare_trial(cfg: ExperimentConfig, prepared: dict[str, Any]) -> Any:
    """A trial's prepared run: its data (and the task bound to it) loaded and checked once per
    process and kept in ``prepared`` under :func:`pf2lora.compare.data_key`, shared by every trial
    and method on it (as ``compare`` shares it between runs); each method still checked."""
    from pf2lora.api import prepare
    from pf2lora.compare import data_key

    key = data_key(cfg)
    if key not in prepared:
        prepared[key] = prepare(cfg).release()  # the data, and the model checked on it
        return prepared[key]
    return prepare(cfg, reuse=prepared[key])


def check_data(study: Study) -> dict[str, Any]:
    """Every method's trial data and model checked before any trial (ConfigError on bad input, e.g.
    a validation fraction that leaves a client without data). Returns the preparations, to be
    handed to :func:`execute`."""
    prepared: dict[str, Any] = {}
    for method in study.methods:
        prepare_trial(study.trial_config(method, {}), prepared)
    return prepared


def run_trials(
    study: Study,
    out: Path,
    method: str,
    worker: int = 0,
    on_trial: Callable[[str], None] | None = None,
    jobs: int = 1,
    prepared: dict[str, Any] | None = None,
) -> None:
    """Draw and run ``method``'s trials until the study holds ``study.trials`` finished ones (one
    of ``jobs`` processes sharing the study: its share, and no trial started once they are all
    finished; processes that start trials at once may finish up to ``jobs - 1`` more).
    ``prepared``: this process's preparations (:func:`prepare_trial`), kept across calls."""
    import optuna

    from pf2lora.api import run_on_engine

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opt_study = _load(study, method, out, worker)
    prepared = {} if prepared is None else prepared

    def objective(trial: Any) -> float:
        values = {s.key: s.suggest(trial) for s in study.spaces[method]}
        cfg = study.trial_config(method, values)
        folder = out / "trials" / method / f"trial{trial.number:03d}"
        trial.set_user_attr("run_dir", str(folder.relative_to(out)))
        if folder.exists():  # a trial number is never reused; a leftover of a failed start
            import shutil

            shutil.rmtree(folder)
        run = prepare_trial(cfg, prepared)
        started = time.perf_counter()
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        try:
            results = run_on_engine(run, folder, callbacks=[Pruning(trial, study.objective, cfg.train.rounds)])
        except optuna.TrialPruned as pruned:
            if on_trial is not None:
                on_trial(
                    f"{method} trial {trial.number}: {shown}: pruned ({pruned}; {time.perf_counter() - started:.0f}s)"
                )
            raise
        value = float(results[method]["mean"][study.objective])
        if on_trial is not None:
            seconds = time.perf_counter() - started
            on_trial(f"{method} trial {trial.number}: {shown}: {study.objective} {value:.4f} ({seconds:.0f}s)")
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{study.objective} is {value}")
        return value

    left = study.trials - _finished(opt_study)
    if left <= 0:
        return
    stop = optuna.study.MaxTrialsCallback(
        study.trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    opt_study.optimize(objective, n_trials=math.ceil(left / jobs), callbacks=[stop], gc_after_trial=True)


def _worker(study_dict: dict[str, Any], out: str, worker: int, threads: int, jobs: int) -> None:
    """One process of ``--jobs``: every method's trials in turn, from the shared studies."""
    import warnings

    import torch

    from pf2lora.parallelism import CORES_ENV

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    os.environ[CORES_ENV] = str(threads)
    study = _from_dict(study_dict)
    if not study.base.train.threads:
        torch.set_num_threads(threads)
    prepared: dict[str, Any] = {}  # this process's data, shared by every method's trials
    for method in study.methods:
        run_trials(study, Path(out), method, worker, on_trial=_print, jobs=jobs, prepared=prepared)


def _print(line: str) -> None:
    print(line, flush=True)  # a --jobs process's line per trial, as it finishes


def _to_dict(study: Study) -> dict[str, Any]:
    d = dict(study.__dict__)
    d["base"] = study.base.to_dict()
    d["spaces"] = {m: [s.__dict__ for s in sl] for m, sl in study.spaces.items()}
    return d


def _from_dict(d: dict[str, Any]) -> Study:
    d = dict(d)
    d["base"] = from_dict(ExperimentConfig, d["base"])
    d["spaces"] = {m: [Space(**{**s, "choices": tuple(s["choices"])}) for s in sl] for m, sl in d["spaces"].items()}
    return Study(**d)


def execute(
    study: Study,
    out: Path,
    resume: bool = False,
    jobs: int = 1,
    on_trial: Callable[[str], None] | None = None,
    prepared: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the studies (``jobs`` processes side by side), then write ``best.yaml``, ``trials.json``
    and the plots. ``resume``: continue the studies in ``out`` (:func:`recover`). ``prepared``:
    what :func:`check_data` prepared, reused by the trials in this process."""
    prepared = {} if prepared is None else prepared
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.yaml").write_text(yaml.safe_dump(_describe(study), sort_keys=False))
    if resume:
        for number in recover(study, out):
            if on_trial is not None:
                on_trial(f"trial {number} was left running: failed, its values queued again")
    else:
        for method in study.methods:
            _load(study, method, out)  # created once, before processes race to create it
    started = time.perf_counter()
    from pf2lora.trackers import publish, shared_store

    with shared_store(study.base, out):  # every trial in one MLflow store where mlflow is named
        if jobs > 1:
            _run_parallel(study, out, jobs)
        else:
            for method in study.methods:
                run_trials(study, out, method, on_trial=on_trial, prepared=prepared)
        summary = summarize(study, out)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        write(summary, study, out)
        if study.base.report_to:  # the trials were logged as they ran; the outcome too, as a run of its own
            publish(study.base, out, "tune", [out / "best.yaml", out / "trials.json", *sorted(out.glob("*.png"))])
    return summary


def _run_parallel(study: Study, out: Path, jobs: int) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_worker, _to_dict(study), str(out), w, threads, jobs) for w in range(jobs)]
        for future in futures:
            future.result()


def _describe(study: Study) -> dict[str, Any]:
    return {
        "config": study.config,
        "overrides": study.overrides,
        "methods": study.methods,
        "search": {m: [s.describe() for s in sl] for m, sl in study.spaces.items()},
        "trials": study.trials,
        "objective": study.objective,
        "sampler": study.sampler,
        "pruner": study.pruner,
        "notes": study.notes,
    }


def summarize(study: Study, out: Path) -> dict[str, Any]:
    """Every method's trials and its best one."""
    from optuna.trial import TrialState

    methods = {}
    for method in study.methods:
        opt_study = _load(study, method, out)
        trials = [
            {
                "number": t.number,
                "state": t.state.name,
                "params": t.params,
                "value": t.value,
                "last_round": max(t.intermediate_values) if t.intermediate_values else None,
                "run_dir": t.user_attrs.get("run_dir"),
                "seconds": None if t.duration is None else round(t.duration.total_seconds(), 1),
            }
            for t in opt_study.get_trials(deepcopy=False)
        ]
        complete = [t for t in opt_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        best = max(complete, key=lambda t: t.value) if complete else None
        methods[method] = {
            "trials": trials,
            "best": None if best is None else {"number": best.number, "params": best.params, "value": best.value},
        }
    return {"objective": study.objective, "methods": methods}


def per_method_block(summary: dict[str, Any]) -> dict[str, Any]:
    """The best values as ``per_method: {method: {section: {key: value}}}``."""
    block: dict[str, Any] = {}
    for method, found in summary["methods"].items():
        if found["best"] is None:
            continue
        tree: dict[str, Any] = {}
        for key, value in found["best"]["params"].items():
            apply_override(tree, f"{key}={_yaml(value)}")
        block[method] = tree
    return {"per_method": block}


def write(summary: dict[str, Any], study: Study, out: Path) -> None:
    (out / "trials.json").write_text(json.dumps(summary, indent=2, default=str))
    header = (
        f"# pf2lora tune: the values with the best mean {study.objective} over clients (each on its own "
        f"validation split),\n# {study.trials} trials per method, study {out / STORAGE}. Paste the block into a config "
        "or pass this file\n# to pf2lora compare --per-method.\n"
    )
    (out / "best.yaml").write_text(header + yaml.safe_dump(per_method_block(summary), sort_keys=False))
    plot(study, out)


def plot(study: Study, out: Path) -> None:
    """Per method: Optuna's optimisation history, intermediate values (the pruned curves) and,
    with two searched keys or more, the parameter importances, as PNGs."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as views

    logging.getLogger("optuna").setLevel(logging.ERROR)
    for method in study.methods:
        opt_study = _load(study, method, out)
        kinds = {"history": views.plot_optimization_history, "curves": views.plot_intermediate_values}
        if len(study.spaces[method]) > 1:
            kinds["importances"] = views.plot_param_importances
        for kind, draw in kinds.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    axes = draw(opt_study)
                except (ValueError, RuntimeError, ZeroDivisionError):
                    continue  # too few finished trials for this view
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.set_size_inches(7, 4.2)
            figure.tight_layout()
            figure.savefig(out / f"{method}_{kind}.png", dpi=110)
            plt.close(figure)


def run(
    config: str | Path | None = None,
    items: list[str] | tuple[str, ...] = (),
    out: str | Path = "runs/tune",
    *,
    methods: list[str] | None = None,
    search: list[str] | tuple[str, ...] = (),
    trials: int | None = None,
    metric: str | None = None,
    sampler: str = "auto",
    pruner: str = "median",
    jobs: int = 1,
    resume: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """A tuning from Python, as ``pf2lora tune`` runs it. Every input is checked before any training."""
    if jobs < 1:
        raise ConfigError(f"jobs must be >= 1, got {jobs}")
    study = plan(
        None if config is None else str(config),
        list(items),
        methods,
        list(search) or None,
        trials,
        metric,
        sampler,
        pruner,
    )
    folder = Path(out)
    check_folder(folder, resume, force, study)
    return execute(study, folder, resume, jobs, prepared=check_data(study))


def check_folder(folder: Path, resume: bool, force: bool, study: Study | None = None) -> None:
    """``--resume`` needs a study in ``folder`` started with the same plan as ``study`` (its
    number of trials may grow); otherwise the folder must be new (or ``force``)."""
    if resume:
        if not (folder / STORAGE).is_file():
            raise ConfigError(f"--resume: {folder} holds no study ({STORAGE})")
        if study is None or not (folder / "tune.yaml").is_file():
            return
        before, now = yaml.safe_load((folder / "tune.yaml").read_text()) or {}, _describe(study)
        for key in ("config", "overrides", "methods", "search", "objective", "sampler"):
            if before.get(key) != now[key]:
                raise ConfigError(
                    f"--resume {folder}: the study was started with {key} {before.get(key)!r}, not {now[key]!r}; "
                    "resume it with its own settings (only --trials may change)"
                )
    else:
        check_out_dir(folder, force)
        if force and (folder / STORAGE).exists():
            (folder / STORAGE).unlink()
