"""Generated examples beside their references, client by client (the paper's Tables 18-21).

    python scripts/examples.py RUN_DIR [RUN_DIR ...] [--per-client N] [--seed S] [--out FILE.md]

Each RUN_DIR is one method's run directory as ``pf2lora run`` or ``pf2lora compare`` leaves it
(``<compare>/runs/<dataset>-h<h>-seed<s>/<method>``), holding ``generations/<method>/client<k>.jsonl``.
For every client, N test inputs are drawn (seeded, the same inputs for every method: the methods of
one comparison share the partition) and printed as a Markdown table: the input, each method's
generated text and the input's first reference (and how many references it has).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def read_generations(run: Path) -> tuple[str, dict[int, list[dict]]]:
    """The method's name and its generations per client, from one run directory."""
    folders = sorted(p for p in (run / "generations").glob("*") if p.is_dir())
    if len(folders) != 1:
        raise SystemExit(f"error: {run} holds no single generations/<method>/ folder (a generation run?)")
    per_client = {}
    for f in folders[0].glob("client*.jsonl"):
        lines = f.read_text(encoding="utf-8").splitlines()
        per_client[int(f.stem.removeprefix("client"))] = [json.loads(x) for x in lines if x.strip()]
    return run.name, per_client


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def examples_table(runs: list[Path], per_client: int, seed: int) -> str:
    methods = [read_generations(r) for r in runs]
    clients = sorted(set.intersection(*(set(g) for _, g in methods)))
    header = ["client", "input", *(name for name, _ in methods), "reference (first of n)"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for k in clients:
        by_input = [{g["input"]: g for g in gens[k]} for _, gens in methods]
        shared = sorted(set.intersection(*(set(b) for b in by_input)))
        for source in random.Random(seed + k).sample(shared, min(per_client, len(shared))):
            refs = by_input[0][source]["references"]
            cells = [str(k), _cell(source), *(_cell(b[source]["prediction"]) for b in by_input)]
            rows.append("| " + " | ".join([*cells, f"{_cell(refs[0])} (n = {len(refs)})"]) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--per-client", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for r in args.runs:
        if not r.is_dir():
            parser.exit(2, f"error: {r} is not a directory\n")
    if args.per_client < 1:
        parser.exit(2, "error: --per-client must be >= 1\n")
    table = examples_table(args.runs, args.per_client, args.seed)
    if args.out:
        args.out.write_text(table, encoding="utf-8")
    else:
        sys.stdout.write(table)


if __name__ == "__main__":
    main()
