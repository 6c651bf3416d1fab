"""Terminal output of the CLI: a progress bar and the summary table (rich)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from pf2lora.metrics import VALIDATION_PREFIX


class Progress:
    """One bar per method, advanced once per client per round."""

    def __init__(self, disabled: bool = False, one_at_a_time: bool = False) -> None:
        """``one_at_a_time``: a new bar replaces the previous ones (a long grid of runs)."""
        self.one_at_a_time = one_at_a_time
        self._bar = RichProgress(
            TextColumn("{task.description:>10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("client-rounds"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=disabled,
            console=Console(stderr=True),
        )

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)

    def task(self, name: str, total: int) -> Callable[[], None]:
        if self.one_at_a_time:
            for old in list(self._bar.task_ids):
                self._bar.remove_task(old)
        task_id = self._bar.add_task(name, total=total)
        return lambda: self._bar.advance(task_id)


LABELS = {"mcc": "MCC", "macro_f1": "macro-F1", "exact_match": "EM", "f1": "F1"}


def label(metric: str) -> str:
    """A metric's column title: ``val_mcc`` is ``val MCC``."""
    if metric.startswith(VALIDATION_PREFIX):
        name = metric[len(VALIDATION_PREFIX) :]
        return "val " + LABELS.get(name, name)
    return LABELS.get(metric, metric)


def metric_names(results: dict[str, Any]) -> list[str]:
    """The run's metric names, primary first (runs written before tasks named them: classification's)."""
    first = next((r for r in results.values() if isinstance(r, dict) and "clients" in r), {})
    return list(first.get("metric_names", ("accuracy", "mcc", "macro_f1")))


def print_summary(results: dict[str, Any], out: Path) -> None:
    """One row per method: the task's primary metric per client (up to 12 clients), its mean +- std
    over clients, the other metrics' means, mean effective rank, time."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file: never squeeze the numbers
    primary, *others = metric_names(results)
    means = next(iter(results.values()))["mean"]
    held_out = [VALIDATION_PREFIX + m for m in (primary, *others)]
    others += [m for m in held_out if m in means]  # the validation split's metrics
    clients = sorted({int(c) for r in results.values() for c in r["clients"]})
    shown = clients if len(clients) <= 12 else []
    split = "validation" if primary.startswith(VALIDATION_PREFIX) else "test"
    table = Table(title=f"{split.capitalize()} {label(primary)} per client (each on its own {split} split)")
    table.add_column("method", no_wrap=True)
    for c in shown:
        table.add_column(str(c), justify="right", no_wrap=True)
    for title in ("mean ± std", *(label(m) for m in others), "rank", "time"):
        table.add_column(title, justify="right", no_wrap=True, style="bold" if title == "mean ± std" else None)
    for method, r in results.items():
        row = [method] + [f"{r['clients'][str(c)][primary]:.3f}" for c in shown]
        ranks = [v for per in r["effective_rank"].values() for v in per.values()]
        row += [
            f"{r['mean'][primary]:.4f} ± {r['std'][primary]:.4f}",
            *(f"{r['mean'][m]:.4f}" for m in others),
            f"{sum(ranks) / len(ranks):.2f}" if ranks else "",
            f"{r['seconds']:.0f}s",
        ]
        table.add_row(*row)
    console.print(table)
    console.print("rank = mean effective rank over clients and adapted modules (90% of singular-value mass)")
    for method, r in results.items():
        if "privacy" in r:
            p = r["privacy"]
            epsilon = p["epsilon"] if isinstance(p["epsilon"], str) else f"{p['epsilon']:.2f}"
            console.print(
                f"{method}: client-level DP, epsilon {epsilon} at delta {p['delta']:g} (noise multiplier "
                f"{p['noise_multiplier']:g}, clip {p['clip']:g}, sampling rate {p['sampling_rate']:g}, "
                f"{p['rounds']} rounds; {p['accountant']}){' - seeded noise: not private' if p['seeded_noise'] else ''}"
            )
    console.print(f"run directory: {out}")


def print_accounting(results: dict[str, Any]) -> None:
    """Computation and communication per round of the model-heterogeneous methods."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)
    table = Table(title="Cost per round (all clients of a round)")
    for title in ("method", "models", "trainable / client", "FLOPs / round", "bytes / round"):
        table.add_column(title, justify="left" if title in ("method", "models") else "right", no_wrap=True)
    for method, r in results.items():
        if method == "accounting":
            continue
        models = ", ".join(dict.fromkeys(r["models"].values()))
        table.add_row(
            method,
            models,
            f"{r['trainable_parameters']:,}",
            f"{r['flops_per_round']:.3e}",
            f"{r['bytes_per_round']:,.0f}",
        )
    console.print(table)
    acc = results.get("accounting")
    if acc:
        console.print(
            f"FedAvg of whole {acc['fedavg_model']} models against pFedLoRA: "
            f"{acc['communication_fedavg_over_pfedlora']:.1f}x the bytes, "
            f"{acc['computation_fedavg_over_pfedlora']:.2f}x the FLOPs per round"
        )
