"""The task seam: engines and the methods they run never name a task or its metrics."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pf2lora
from pf2lora import compare
from pf2lora.config import ConfigError
from pf2lora.tasks import TASKS

SRC = Path(pf2lora.__file__).parent
# the model-heterogeneous methods classify by construction (their own models and heads)
TASK_SPECIFIC = {"algorithms/pfedlora.py"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


@pytest.mark.parametrize("folder", ["engines", "algorithms"])
def test_engines_and_algorithms_do_not_know_the_task(folder: str) -> None:
    for path in sorted((SRC / folder).rglob("*.py")):
        if str(path.relative_to(SRC)) in TASK_SPECIFIC:
            continue
        text = path.read_text()
        assert not any(m.startswith("pf2lora.tasks.") for m in _imports(path) if m != "pf2lora.tasks.base"), path
        for word in ('"accuracy"', '"mcc"', '"labels"', "cross_entropy"):
            assert word not in text, f"{path} names {word}"


def test_every_task_names_its_primary_metric_among_its_metrics() -> None:
    for task in TASKS.values():
        assert task.primary == task.metrics[0]
        # a head to train, except generation, where only the adapters train
        assert bool(task.head_candidates) == (task.name != "generation")


def test_compare_metric_must_be_one_of_the_tasks() -> None:
    with pytest.raises(ConfigError, match="unknown metric 'f1' for task classification"):
        compare.plan(None, [], metric="f1")
    assert compare.plan(None, []).metric == "accuracy"  # the task's primary metric by default
