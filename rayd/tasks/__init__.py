"""Reasoning tasks: prompts with gold rationales and an exact answer verifier."""

import inspect

from rayd.tasks.arithmetic import AdditionTask, SubtractionTask
from rayd.tasks.base import Example, Task
from rayd.tasks.jsonl import JsonlTask

TASKS: dict[str, type[Task]] = {
    "addition": AdditionTask,
    "jsonl": JsonlTask,
    "subtraction": SubtractionTask,
}


def make_task(name: str, **options: object) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    takes = [p for p in inspect.signature(TASKS[name]).parameters if p != "seed"]
    unknown = sorted(set(options) - {*takes, "seed"})
    if unknown:  # named here, not as a constructor's "unexpected keyword argument"
        raise KeyError(
            f"task {name!r} has no option {', '.join(map(repr, unknown))}; its options: "
            + ", ".join(takes)
        )
    return TASKS[name](**options)  # type: ignore[arg-type]


__all__ = ["TASKS", "AdditionTask", "Example", "JsonlTask", "SubtractionTask", "Task", "make_task"]
