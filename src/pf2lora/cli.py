"""Command line: ``pf2lora run [CONFIG] [key=value ...] [--out DIR] [--force] [--resume DIR]``, ``pf2lora compare``,
``pf2lora tune``,
``pf2lora synthetic``, ``pf2lora methods``, ``pf2lora site`` (a Flower site's task runner);
``pf2lora --allocator jemalloc COMMAND ...`` runs any of them under another malloc (``allocator.py``).

Bad input (config, data, model) is reported as one line on stderr with exit status 2, before any
training starts and before anything is written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pf2lora.config import ConfigError, ExperimentConfig, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pf2lora", description="Personalized federated LoRA fine-tuning.")
    parser.add_argument(
        "--allocator",
        default=os.environ.get("PF2LORA_ALLOCATOR", "system"),
        metavar="NAME",
        help="the malloc to run under: system (default), jemalloc, tcmalloc, or a shared library's path; "
        "jemalloc holds a training's transient memory near what is live (default: $PF2LORA_ALLOCATOR or system)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment (every method in `algorithms`)")
    run.add_argument(
        "items",
        nargs="*",
        metavar="[CONFIG] [key=value ...]",
        help="a YAML config (default: built-in defaults), then dotted overrides such as train.rounds=5",
    )
    run.add_argument("--out", type=Path, help="run directory (default: runs/<name>-<time>)")
    run.add_argument("--force", action="store_true", help="allow writing into a non-empty --out")
    run.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run killed in DIR from its last complete round; a CONFIG given must be the run's "
        "own, overrides apply to the run's config (only train.workers may change)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    cmp = sub.add_parser(
        "compare",
        help="a comparison table: methods x heterogeneity levels (or datasets), over seeds",
        description="Runs every method on the same partitions for each heterogeneity level / dataset and seed, "
        "and writes table.md, table.csv, table.json and compare.png. The methods are LoRA methods, or the "
        "model-heterogeneous ones (`pf2lora methods` lists both). The list axes: algorithms=a,b "
        "heterogeneity=0.6,0.9 seeds=0,1 datasets=x,y; any other key=value overrides the config.",
    )
    cmp.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    cmp.add_argument("--out", type=Path, help="output directory (default: runs/compare-<name>-<time>)")
    cmp.add_argument("--force", action="store_true", help="allow writing into a non-empty --out")
    cmp.add_argument(
        "--resume",
        action="store_true",
        help="keep finished runs in --out, continue half-done ones from their last complete round, run the rest",
    )
    cmp.add_argument(
        "--metric",
        default=None,
        help="default: the task's primary metric (classification: accuracy; also mcc, macro_f1)",
    )
    cmp.add_argument(
        "--round",
        type=int,
        default=None,
        metavar="N",
        help="the table from every run's evaluation after round N (one that train.eval_every evaluates) "
        "instead of its final one: with --resume on a finished comparison, a point of the learning curve",
    )
    cmp.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2", help="one row per value (Appendix L sweeps)"
    )
    cmp.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="'ALGO key=value ...'",
        help="an extra row: a method with overrides",
    )
    cmp.add_argument(
        "--baseline",
        metavar="ROW",
        help="also compare every other row with this one seed by seed (e.g. local): mean difference, 95%% "
        "confidence interval, seeds won / tied / lost",
    )
    cmp.add_argument(
        "--ablation",
        action="append",
        default=[],
        metavar="NAME",
        help="bilevel: PF2LoRA without the bilevel step (F.2)",
    )
    cmp.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs at once, each in its own process (default 1); give train.threads=N_CORES/JOBS for a stable split",
    )
    cmp.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="the table from the clients' test splits (default) or their validation splits (data.validation_fraction)",
    )
    cmp.add_argument(
        "--per-method",
        type=Path,
        metavar="FILE",
        help="a YAML file with a per_method block (pf2lora tune's best.yaml): each method run at its values",
    )
    cmp.add_argument("--quiet", action="store_true", help="no progress bar")
    tune = sub.add_parser(
        "tune",
        help="choose hyperparameters per method on validation data (Optuna), never on the test split",
        description="For each method, an Optuna study searches the --search keys by maximising the mean validation "
        "metric over clients: each trial is a run of that method with data.validation_fraction of every client's "
        "training data held out (0.2 unless set) and evaluated on it alone (the test split is never encoded), "
        "pruned on its per-round validation curve. Writes best.yaml (a per_method block for a config or "
        "pf2lora compare --per-method), trials.json, Optuna's plots, and the study in study.db (SQLite).",
    )
    tune.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    tune.add_argument("--methods", metavar="A,B", help="the methods to tune (default: the config's algorithms)")
    tune.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="[METHOD/]KEY=SPEC",
        help="a key to search: log:LOW:HIGH, LOW:HIGH, int:LOW:HIGH or V1,V2,... (all lists: a grid); METHOD/ "
        "limits it to one method; repeat for several (default: train.lr=log:1e-4:1e-2)",
    )
    tune.add_argument("--trials", type=int, metavar="N", help="trials per method (default: the grid's size, else 10)")
    tune.add_argument("--metric", help="the validation metric maximised (default: the task's primary metric)")
    tune.add_argument("--sampler", default="auto", help="auto (grid for lists, else TPE) | tpe | random | grid")
    tune.add_argument("--pruner", default="median", help="median (Optuna's MedianPruner) | none")
    tune.add_argument("--jobs", type=int, default=1, metavar="N", help="processes drawing trials side by side")
    tune.add_argument("--out", type=Path, help="output directory (default: runs/tune-<name>-<time>)")
    tune.add_argument("--force", action="store_true", help="allow writing into a non-empty --out (a new study)")
    tune.add_argument(
        "--resume", action="store_true", help="continue the study in --out: finished trials kept, the rest run"
    )
    tune.add_argument("--quiet", action="store_true", help="no line per trial")
    sub.add_parser("methods", help="list every method pf2lora can run, with its family and a one-line description")
    syn = sub.add_parser("synthetic", help="the paper's synthetic rank-recovery experiment (Figure 2)")
    syn.add_argument("--out", type=Path, default=Path("runs/synthetic"), help="output directory")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--truth", default="shared", help="shared (default) | independent: see the docs")
    syn.add_argument("--steps", type=int, default=None, help="training steps (default 10000)")
    syn.add_argument("--force", action="store_true", help="allow writing into a non-empty --out")
    site = sub.add_parser(
        "site",
        help="a Flower site's task runner that loads the model once per run (flower-supernode --isolation process)",
        description="Runs the ClientApp tasks of one SuperNode started with `--isolation process`, each in a fork of "
        "this process, which prepares the experiment (data, base model) once per run instead of once per message. "
        "Several SuperNodes on one host: one --runtime-api-address each; the libraries are imported once and one "
        "task loop per SuperNode is forked.",
    )
    site.add_argument(
        "--runtime-api-address",
        required=True,
        action="append",
        metavar="HOST:PORT",
        help="the SuperNode's Runtime API (its --host and --port); repeat it for each SuperNode on this host",
    )
    tls = site.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="connect without TLS (the SuperNode's own host only)")
    tls.add_argument("--root-certificates", type=Path, metavar="PEM", help="CA certificate of the Runtime API")
    node = sub.add_parser(
        "supernode",
        help="Flower's flower-supernode with a shorter wait between pulls that find no message (Flower's: 3 s)",
        description="Runs Flower's own SuperNode with every argument after --pull-interval passed to it unchanged; "
        "the only difference is the wait between the pulls that find no message, which Flower fixes at 3 s.",
    )
    node.add_argument(
        "--pull-interval",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="wait between empty pulls, 0 < S <= 3 (default 3, Flower's); 0.2 suits a federation on one machine",
    )
    return parser


def run_supernode(args: argparse.Namespace, flower_args: list[str]) -> int:
    from pf2lora.engines.flower.supernode import interval_problem  # no Flower import at module level

    if (problem := interval_problem(args.pull_interval)) is not None:
        print(f"pf2lora: error: {problem}", file=sys.stderr)
        return 2
    run = _flower_entry("supernode", "pf2lora.engines.flower.supernode", "run")
    return 2 if run is None else run(args.pull_interval, flower_args)


def _flower_entry(command: str, module: str, name: str) -> Any:
    """``module.name``, or None after a one-line error where Flower is not installed."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as err:
        print(f"pf2lora: error: pf2lora {command} needs Flower: pip install 'pf2lora[flower]' ({err})", file=sys.stderr)
        return None


def run_site(args: argparse.Namespace) -> int:
    for address in args.runtime_api_address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            print(f"pf2lora: error: --runtime-api-address must be HOST:PORT, not {address!r}", file=sys.stderr)
            return 2
    if len(set(args.runtime_api_address)) < len(args.runtime_api_address):
        print("pf2lora: error: a --runtime-api-address is given twice (one task loop per SuperNode)", file=sys.stderr)
        return 2
    if args.root_certificates is not None and not args.root_certificates.is_file():
        print(f"pf2lora: error: --root-certificates {args.root_certificates} is not a file", file=sys.stderr)
        return 2
    serve = _flower_entry("site", "pf2lora.engines.flower.site", "serve_many")
    if serve is None:
        return 2
    certificates = str(args.root_certificates) if args.root_certificates else None
    return serve(args.runtime_api_address, args.insecure, certificates)


def methods() -> int:
    from pf2lora.methods import get, names

    width = max(len(n) for n in names())
    for name in names():
        m = get(name)
        family = "LoRA" if m.family == "lora" else "own models"
        print(f"{name.ljust(width)}  {family:10s}  {m.description}")
    return 0


def synthetic(args: argparse.Namespace) -> int:
    import json

    from pf2lora.config import check_out_dir
    from pf2lora.experiments.synthetic import SyntheticConfig, run_synthetic

    try:
        cfg = SyntheticConfig(seed=args.seed, truth=args.truth)
        if args.steps is not None:
            cfg.steps = args.steps
        cfg.validate()
        check_out_dir(args.out, args.force)
    except ConfigError as err:
        print(f"pf2lora: error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run_synthetic(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "synthetic.json").write_text(json.dumps(results))
    from pf2lora.plots import plot_figure2

    plot_figure2(results, args.out / "figure2.png")
    print(f"true ranks {results['true_ranks']}, noise floors {results['noise_floor']}")
    for method, clients in results["methods"].items():
        for client, data in clients.items():
            f = data["final"]
            print(
                f"{method:8s} {client}: rank {f['rank']}, train {f['train_loss']:.4f}, "
                f"test {f['test_loss']:.4f}, ||W - W*||_F {f['frobenius']:.4f}"
            )
    print(f"{time.perf_counter() - started:.1f}s; wrote {args.out / 'synthetic.json'} and {args.out / 'figure2.png'}")
    return 0


def config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """A command's positional items: a YAML config first where one is given, then key=value overrides."""
    config = items[0] if items and "=" not in items[0] else None
    return config, items[1:] if config is not None else items


def check_jobs(jobs: int) -> None:
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")


def compare(args: argparse.Namespace, items: list[str]) -> int:
    from pf2lora import compare as cmp
    from pf2lora.config import check_out_dir

    config, overrides = config_and_overrides(items)
    try:
        check_jobs(args.jobs)
        if args.round is not None and args.round < 0:
            raise ConfigError(f"--round must be >= 0, got {args.round}")
        if args.per_method is not None:
            overrides = [*overrides, *per_method_overrides(args.per_method)]
        grid = cmp.plan(
            config,
            overrides,
            args.sweep,
            args.variant,
            args.ablation,
            args.metric,
            args.baseline,
            args.round,
            split=args.split,
        )
        name = grid.runs[0][3].name
        out = args.out or Path("runs") / f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not args.resume:
            check_out_dir(out, args.force)
        elif out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a directory")
    except ConfigError as err:
        print(f"pf2lora: error: {err}", file=sys.stderr)
        return 2
    from rich.console import Console

    from pf2lora.report import Progress

    console = Console(stderr=True)
    console.print(
        f"{len(grid.runs)} runs: {len(grid.rows)} rows x {len(grid.columns)} columns x {len(grid.seeds)} seeds"
    )
    try:
        with Progress(disabled=args.quiet, one_at_a_time=True) as progress:
            table = cmp.execute(
                grid,
                out,
                args.resume,
                on_run=lambda i, n, what: console.print(f"[{i + 1}/{n}] {what}") if not args.quiet else None,
                progress=progress.task,
                jobs=args.jobs,
            )
    except ConfigError as err:  # data or model problems found while preparing, before any training
        print(f"pf2lora: error: {err}", file=sys.stderr)
        return 2
    print(cmp.markdown(table))
    print(f"{table['seconds']:.0f}s; wrote {out}/table.md, table.csv, table.json, compare.png")
    return 0


def per_method_overrides(path: Path) -> list[str]:
    """A YAML file's ``per_method`` block as dotted overrides (``per_method.M.train.lr=V``), so that
    it sets those values over what the config says and keeps the rest."""
    import json

    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"--per-method {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--per-method {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    block = data.get("per_method") if isinstance(data, dict) else None
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"--per-method {path} holds no per_method block")
    out = []

    def walk(tree: Any, prefix: str) -> None:
        if isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}.{key}")
        else:
            out.append(f"{prefix}={json.dumps(tree)}")

    walk(block, "per_method")
    return out


def tune(args: argparse.Namespace, items: list[str]) -> int:
    from pf2lora import tune as tuning

    config, overrides = config_and_overrides(items)
    try:
        check_jobs(args.jobs)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
        if methods is not None and not methods:
            raise ConfigError("--methods: give at least one method")
        study = tuning.plan(
            config, overrides, methods, args.search or None, args.trials, args.metric, args.sampler, args.pruner
        )
        out = args.out or Path("runs") / f"tune-{study.base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tuning.check_folder(out, args.resume, args.force, study)
        prepared = tuning.check_data(study)  # the data, the model and the held-out split, before any trial
    except ConfigError as err:
        print(f"pf2lora: error: {err}", file=sys.stderr)
        return 2
    say = print if not args.quiet else (lambda line: None)
    for method, spaces in study.spaces.items():
        say(f"{method}: {study.trials} trials ({study.sampler}) over {'; '.join(s.describe() for s in spaces)}")
    for note in study.notes:
        say(f"note: {note}")
    try:
        summary = tuning.execute(study, out, args.resume, args.jobs, on_trial=say, prepared=prepared)
    except ConfigError as err:
        print(f"pf2lora: error: {err}", file=sys.stderr)
        return 2
    for method, found in summary["methods"].items():
        best = found["best"]
        if best is None:
            print(f"{method}: no trial finished")
            continue
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        print(f"{method}: best {summary['objective']} {best['value']:.4f} at {shown} (trial {best['number']})")
    print(f"{summary['seconds']:.0f}s; wrote {out}/best.yaml, trials.json, the plots and {out}/study.db")
    return 0


def resumed_config(out: Path, config: str | None, overrides: list[str]) -> ExperimentConfig:
    """The config ``--resume out`` runs: the run's own; a ``config`` given must be the same, and
    ``overrides`` apply on top of it (both checked by :func:`pf2lora.runner.check_resume`)."""
    from pf2lora.runner import check_resume

    written = check_resume(out, None)
    if config is None and not overrides:
        return written
    return check_resume(out, load_config(config, overrides, base=None if config is not None else written))


def flower_federation_error() -> type[Exception]:
    """Flower's error for a federation that cannot go on (its simulation runtime importable), or a
    ConfigError saying how to install Flower."""
    try:
        import pf2lora.engines.flower.simulation  # noqa: F401 - what engine=flower runs on
        from pf2lora.engines.flower.messaging import FederationError
    except ImportError as err:
        raise ConfigError(f"engine=flower needs Flower: pip install 'pf2lora[flower]' ({err})") from err
    return FederationError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        from pf2lora.allocator import preload

        preload(args.allocator, own_process=argv is None)  # runs the command again under it
    except ConfigError as err:
        print(f"pf2lora: error: {err}", file=sys.stderr)
        return 2
    if args.command == "methods":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return methods()
    if args.command == "site":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return run_site(args)
    if args.command == "supernode":
        return run_supernode(args, extra)
    if args.command == "synthetic":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return synthetic(args)
    if args.command in ("tune", "compare"):
        unknown = [e for e in extra if e.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        return (tune if args.command == "tune" else compare)(args, [*args.items, *extra])
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    items = [*args.items, *extra]
    config, overrides = config_and_overrides(items)
    try:
        from pf2lora.api import check_out_dir, prepare, run_on_engine

        if args.resume is not None:
            if args.out is not None and args.out.resolve() != args.resume.resolve():
                raise ConfigError(f"--out {args.out} and --resume {args.resume} name different directories")
            out, cfg = args.resume, resumed_config(args.resume, config, overrides)
            if (out / "results.json").is_file() and not (out / "resume").exists():
                print(f"pf2lora: the run in {out} is complete; nothing to resume")
                return 0
        else:
            cfg = load_config(config, overrides)
            out = args.out or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            check_out_dir(out, args.force)
        from pf2lora.engines.local import RoundFailed

        federation_errors: tuple[type[Exception], ...] = (RoundFailed,)  # too few good updates in a round
        if cfg.engine == "flower":
            federation_errors += (flower_federation_error(),)  # Flower installed, before any work
        prepared = prepare(cfg)
    except ConfigError as err:
        print(f"pf2lora: error: {err}", file=sys.stderr)
        return 2
    from pf2lora.report import Progress, print_accounting, print_summary

    with Progress(disabled=args.quiet) as progress:
        try:
            results = run_on_engine(prepared, out, progress.task, resume=args.resume is not None)
        except federation_errors as err:  # too few good updates: what ran is in the run directory
            print(f"pf2lora: error: {err}", file=sys.stderr)
            return 1
    print_summary({k: v for k, v in results.items() if k != "accounting"}, out)
    if any("flops_per_round" in r for k, r in results.items() if k != "accounting"):
        print_accounting(results)  # the model-heterogeneous methods' cost per round
    return 0


if __name__ == "__main__":
    sys.exit(main())
