"""The tasks (one module each) and their registry: ``task.name`` in a config picks one."""

from __future__ import annotations

from pf2lora.tasks.base import Task
from pf2lora.tasks.classification import Classification
from pf2lora.tasks.qa import QuestionAnswering

TASKS: dict[str, type[Task]] = {task.name: task for task in (Classification, QuestionAnswering)}


def task_class(name: str) -> type[Task]:
    return TASKS[name]


__all__ = ["TASKS", "Classification", "QuestionAnswering", "Task", "task_class"]
