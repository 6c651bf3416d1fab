"""PNG plots of a run: the task's primary metric per client and method, and the learning curves per round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_run(out: Path, results: dict[str, Any], metrics_path: Path) -> None:
    methods = list(results)
    # the primary metric first (runs written before tasks named their metrics: classification's)
    primary = results[methods[0]].get("metric_names", ["accuracy"])[0]
    clients = sorted({int(c) for r in results.values() for c in r["clients"]})
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(clients) + 2), 3.8))
    width = 0.8 / max(len(methods), 1)
    for i, method in enumerate(methods):
        values = [results[method]["clients"][str(c)][primary] for c in clients]
        label = f"{method} (mean {results[method]['mean'][primary]:.3f})"
        ax.bar(np.arange(len(clients)) + i * width, values, width, label=label)
    ax.set_xticks(np.arange(len(clients)) + width * (len(methods) - 1) / 2, [str(c) for c in clients])
    ax.set_xlabel("client")
    ax.set_ylabel(f"test {primary} (own split)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title(f"Per-client {primary}")
    fig.tight_layout()
    fig.savefig(out / f"{primary}_per_client.png", dpi=120)
    plt.close(fig)

    curves: dict[str, tuple[list[int], list[float], list[float]]] = {m: ([], [], []) for m in methods}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        rounds, losses, accs = curves[record["algorithm"]]
        rounds.append(record["round"])
        clients = record["clients"].values()  # none in round 0 (the untrained model's evaluation)
        losses.append(float(np.mean([c["train_loss"] for c in clients])) if clients else np.nan)
        accs.append(float(np.mean([e[primary] for e in record["eval"].values()])) if "eval" in record else np.nan)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, (rounds, losses, accs) in curves.items():
        left.plot(rounds, losses, marker=".", label=method)
        mask = ~np.isnan(np.array(accs, dtype=float))
        right.plot(np.array(rounds)[mask], np.array(accs)[mask], marker="o", label=method)
    left.set(xlabel="round", ylabel="mean train loss", title="Training loss")
    right.set(xlabel="round", ylabel=f"mean client {primary}", title=f"Test {primary}")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


def plot_figure2(results: dict[str, Any], path: Path) -> None:
    """The paper's Figure 2: train loss, test loss, ||W_k - W*_k||_F and effective rank per step."""
    panels = (
        ("train_loss", "train loss", True),
        ("test_loss", "test loss", True),
        ("frobenius", "||W_k - W*_k||_F", True),
        ("rank", "effective rank (90%)", False),
    )
    colors = {"pf2lora": "tab:blue", "hetlora": "tab:red"}
    styles = {"client1": "-", "client2": "--"}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        for method, clients in results["methods"].items():
            for client, data in clients.items():
                h = data["history"]
                label = f"{'PF2LoRA' if method == 'pf2lora' else 'HETLoRA'} {client.replace('client', 'client ')}"
                ax.plot(h["step"], h[key], styles[client], color=colors[method], label=label, linewidth=1.6)
        if key.endswith("loss"):
            for client, floor in results["noise_floor"].items():
                ax.axhline(floor, color="grey", linestyle=styles[client], linewidth=0.8)
        if key == "rank":
            for r in results["true_ranks"]:
                ax.axhline(r, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    truth = results["config"]["truth"]
    fig.suptitle(
        f"Synthetic rank recovery (true ranks {results['true_ranks']}, truth={truth}; grey: noise floors / true ranks)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(table: dict[str, Any], path: Path) -> None:
    """Left: the metric against the table's columns (heterogeneity levels) per method, with the std
    over seeds. Right: per-client values (mean over seeds) in the last column, per method."""
    columns, rows, metric = table["columns"], table["rows"], table["metric"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1.4]})
    x = np.arange(len(columns))
    dodge = 0.25 / max(len(rows), 1)  # side by side, so the error bars of one column do not hide each other
    for i, r in enumerate(rows):
        mean = [r["cells"][c]["mean"] for c in columns]
        std = [r["cells"][c]["std"] for c in columns]
        left.errorbar(x + (i - (len(rows) - 1) / 2) * dodge, mean, yerr=std, marker="o", capsize=3, label=r["method"])
    left.set_xticks(x, columns)
    by_level = all("h=" in c for c in columns)
    left.set_xlabel("heterogeneity (label-sorted fraction of each client's data)" if by_level else "setting")
    left.set_ylabel(f"mean client {metric}")
    seeds = f"seeds {table['seeds']}" if len(table["seeds"]) <= 5 else f"{len(table['seeds'])} seeds"
    after = "" if table.get("round") is None else f" after round {table['round']}"
    left.set_title(f"{metric}{after} against {'heterogeneity' if by_level else 'setting'} (± std over {seeds})")
    left.legend(fontsize=8)
    last = columns[-1]
    clients = list(rows[0]["cells"][last]["clients"])
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        values = [r["cells"][last]["clients"][c] for c in clients]
        right.bar(np.arange(len(clients)) + i * width, values, width, label=r["method"])
    right.set_xticks(np.arange(len(clients)) + width * (len(rows) - 1) / 2, clients)
    right.set_xlabel("client")
    right.set_ylabel(f"{metric} on its own test split")
    right.set_title(f"per-client {metric} at {last} (mean over seeds)")
    if metric != "mcc":
        right.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
