"""What a finished PF2LoRA run's two levels each contribute, client by client.

    python scripts/decompose.py RUN_DIR [RUN_DIR ...] [--json OUT]

For every PF2LoRA run directory (as ``pf2lora run`` or ``pf2lora compare`` leaves it) it rebuilds
the run's data partition and model from ``config.yaml``, loads the final common adapter
(``checkpoints/pf2lora/common.safetensors``) and each client's personal adapter, and evaluates
each client's test split twice: with its personal adapter (the model PF2LoRA reports) and with the
personal product ``D_k C_k`` set to zero (the common adapter alone, as a global model would be
evaluated). It also reports ``||s~ D_k C_k||_F / ||s B A||_F`` summed over the adapted modules:
how large the personal update is beside the common one. With ``lora.head=personal`` the head is
part of the personal level and "common alone" keeps each client's own head.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pf2lora.adapters.rank import personal_to_common
from pf2lora.adapters.two_level import PERSONAL
from pf2lora.algorithms.base import Instruction
from pf2lora.config import load_config
from pf2lora.methods import build_algorithm
from pf2lora.runner import prepare


def decompose(run: Path) -> dict:
    cfg = load_config(run / "config.yaml")
    cfg.algorithms = ["pf2lora"]
    prepared = prepare(cfg)
    _, client, model = build_algorithm("pf2lora", cfg, prepared.base_model(), prepared.task)
    folder = run / "checkpoints" / "pf2lora"
    common = load_file(str(folder / "common.safetensors"))
    names = prepared.task.metrics[:2]  # classification: accuracy, MCC; QA: F1, exact match
    out: dict = {"run": str(run), "metrics": list(names), "clients": {}}
    for cid, test in enumerate(prepared.data.test):
        personal = load_file(str(folder / f"personal_client{cid}.safetensors"))
        without = {k: (torch.zeros_like(v) if f".lora_B.{PERSONAL}." in k else v) for k, v in personal.items()}
        both = client.evaluate(cid, Instruction(common), {"personal": personal}, test)
        alone = client.evaluate(cid, Instruction(common), {"personal": without}, test)
        out["clients"][str(cid)] = {
            "with_personal": {k: both[k] for k in names},
            "common_alone": {k: alone[k] for k in names},
            "personal_to_common_norm": personal_to_common(model.layout, {**common, **personal}),
        }
    clients = out["clients"].values()
    for key in ("with_personal", "common_alone"):
        out[key] = {m: sum(c[key][m] for c in clients) / len(clients) for m in names}
    out["personal_to_common_norm"] = sum(c["personal_to_common_norm"] for c in clients) / len(clients)
    return out


def _show(metrics: dict[str, float]) -> str:
    return " / ".join(f"{name} {100 * value:.1f}" for name, value in metrics.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="write every run's decomposition here")
    args = parser.parse_args(argv)
    results = []
    for run in args.runs:
        if not (run / "checkpoints" / "pf2lora" / "common.safetensors").is_file():
            print(f"decompose: {run} holds no finished PF2LoRA run", file=sys.stderr)
            return 2
        r = decompose(run)
        results.append(r)
        print(
            f"{run}: with personal {_show(r['with_personal'])}; common alone {_show(r['common_alone'])}; "
            f"||personal|| / ||common|| {r['personal_to_common_norm']:.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
