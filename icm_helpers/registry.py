"""Registries: one entry per task and per data source, filled by the modules that implement them (decorators, as
CompressAI's ``registry``). Adding a task means one registered class in each of ``RECOGNIZERS``, ``METRICS``,
``RESAMPLERS`` and ``AUX_BRANCHES``; adding a dataset means one class in ``DATA_SOURCES``. Code that needs the
thing for a task looks it up here instead of testing the task's name."""
from __future__ import annotations

from typing import Any, Callable

TASKS = ("detection", "segmentation")


class Registry(dict):
    """``name -> object``; ``registry[name]`` for an unknown name raises a ValueError that lists the valid ones."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self[name] = obj
            return obj

        return add

    def __missing__(self, name: str) -> Any:
        raise ValueError(f"unknown {self.what} {name!r}; valid: {', '.join(sorted(self))}")


RECOGNIZERS = Registry("recognizer task")  # task -> recognizer class (recognizers.py)
METRICS = Registry("metric task")  # task -> evaluation metric class (evaluation.py)
RESAMPLERS = Registry("bootstrap task")  # task -> per-record metric under image resampling (bootstrap.py)
AUX_BRANCHES = Registry("auxiliary-branch task")  # task -> branch builder (aux_branches.py)
DATA_SOURCES = Registry("data source")  # profile data.source -> DataSource class (datasources.py)
PER_IMAGE_COLUMNS = Registry("per-image columns task")  # task -> its metric's per-image table columns (exports.py)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task
