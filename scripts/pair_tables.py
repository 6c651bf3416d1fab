"""Pair two `pf2lora compare` tables row by row, seed by seed: each method of table B minus the same
method of table A (the same seeds are the same partitions), with compare's own paired statistics.

    python scripts/pair_tables.py runs/compare-fp32/table.json runs/compare-bf16/table.json

Used for docs/results/bf16_base.md (the same comparison at two values of model.dtype).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pf2lora.compare import paired


def main(first: str, second: str) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (first, second))
    if a["seeds"] != b["seeds"]:
        sys.exit(f"the tables have different seeds: {a['seeds']} and {b['seeds']}")
    rows_a = {r["method"]: r for r in a["rows"]}
    print(f"{b['metric']} x100, {second} minus {first}, seeds {a['seeds']}")
    for row in b["rows"]:
        other = rows_a.get(row["method"])
        if other is None:
            continue
        for column, cell in row["cells"].items():
            p = paired(cell["seeds"], other["cells"][column]["seeds"])
            ci = "" if p["ci95"] is None else f" [{100 * p['ci95'][0]:+.2f}, {100 * p['ci95'][1]:+.2f}]"
            before, after = 100 * other["cells"][column]["mean"], 100 * cell["mean"]
            print(
                f"{row['method']:>12} {column}: {before:.2f} -> {after:.2f}, "
                f"difference {100 * p['mean']:+.2f} ± {100 * p['std']:.2f}{ci}, {p['wins']}/{p['ties']}/{p['losses']}"
            )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/pair_tables.py A/table.json B/table.json")
    main(*sys.argv[1:])
