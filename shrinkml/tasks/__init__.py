"""What "accuracy" means for a run: the registered tasks (``shrinkml.core.registry.TASKS``).

>>> get_task("classification").primary_metric((8, 10))
'accuracy'
"""

from __future__ import annotations

from shrinkml.core.registry import TASKS
from shrinkml.errors import InputError
from shrinkml.tasks.base import (
    NEIGHBOURS,
    WORST_FRACTION,
    Task,
    fidelity_scores,
    neighbour_agreement,
    worst_fraction_mean,
)

__all__ = ["NEIGHBOURS", "TASK_NAMES", "WORST_FRACTION", "Task", "fidelity_scores", "get_task",
           "neighbour_agreement", "worst_fraction_mean"]

TASK_NAMES = TASKS.names()


def get_task(name: str) -> Task:
    if name in TASKS:
        return TASKS.get(name)
    raise InputError(
        f"unknown task {name!r}",
        where="--task",
        expected="one of " + ", ".join(TASKS.names()),
        fix="pass --task classification (needs labels), --task fidelity (label-free) or --task embedding"
        " (embedding models, label-free)",
    )
