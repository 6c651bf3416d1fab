"""The tasks (one module each) and their registry: ``task.name`` in a config picks one."""

from __future__ import annotations

from pathlib import Path

from pf2lora.tasks.base import Task
from pf2lora.tasks.classification import Classification
from pf2lora.tasks.generation import Generation
from pf2lora.tasks.qa import QuestionAnswering

TASKS: dict[str, type[Task]] = {task.name: task for task in (Classification, QuestionAnswering, Generation)}


def task_class(name: str) -> type[Task]:
    return TASKS[name]


def records_dir(out: Path, task: str, method: str) -> Path:
    """Where the final evaluation of ``method`` keeps each client's per-example outputs (the
    record files ``client<k>.jsonl``): ``<out>/generations/<method>`` for generation,
    ``<out>/predictions/<method>`` for QA."""
    return out / TASKS[task].records / method


__all__ = ["TASKS", "Classification", "Generation", "QuestionAnswering", "Task", "records_dir", "task_class"]
