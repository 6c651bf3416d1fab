"""Terminal output of the CLI: a progress bar and the summary table (rich)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table


class Progress:
    """One bar per method, advanced once per client per round."""

    def __init__(self, disabled: bool = False) -> None:
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
        task_id = self._bar.add_task(name, total=total)
        return lambda: self._bar.advance(task_id)


def print_summary(results: dict[str, Any], out: Path) -> None:
    console = Console()
    methods = list(results)
    clients = sorted({int(c) for r in results.values() for c in r["clients"]})
    table = Table(title="Test accuracy per client (own test split)")
    table.add_column("client", justify="right")
    for method in methods:
        table.add_column(method, justify="right")
        if results[method]["effective_rank"].get(str(clients[0])):
            table.add_column(f"{method} rank", justify="right", style="dim")
    for c in clients:
        row = [str(c)]
        for method in methods:
            row.append(f"{results[method]['clients'][str(c)]['accuracy']:.4f}")
            ranks = results[method]["effective_rank"].get(str(c))
            if results[method]["effective_rank"].get(str(clients[0])):
                row.append(f"{sum(ranks.values()) / len(ranks):.2f}" if ranks else "")
        table.add_row(*row)
    mean_row = ["mean"]
    for method in methods:
        r = results[method]
        mean_row.append(f"{r['mean']['accuracy']:.4f} ± {r['std']['accuracy']:.4f}")
        if r["effective_rank"].get(str(clients[0])):
            mean_row.append("")
    table.add_row(*mean_row, style="bold")
    console.print(table)
    for method in methods:
        m = results[method]["mean"]
        console.print(
            f"{method}: mean accuracy {m['accuracy']:.4f}, MCC {m['mcc']:.4f}, macro-F1 {m['macro_f1']:.4f}, "
            f"{results[method]['seconds']:.0f}s"
        )
    console.print("rank = mean effective rank over adapted modules (90% of singular-value mass)")
    console.print(f"run directory: {out}")
