"""Verifiable tasks: prompts with a reward that a program checks.

A :class:`Task` has training prompts (to sample preference pairs from), held-out prompts (to measure the
model before and after training), and ``reward(prompt, completion) -> float``. The embedded default trains
on the built-in ``addition`` task; a user's own task is named as ``module:attribute``, where the attribute
is a :class:`Task` or a function of no arguments returning one.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from dpolab.tasks import addition
from dpolab.tasks.task import Reward, Task

__all__ = ["Reward", "Task", "builtin_tasks", "load_object", "load_reward", "load_task"]


def builtin_tasks() -> dict[str, Callable[[], Task]]:
    return {"addition": addition.task}


def load_object(spec: str):
    """The object named by ``module:attribute`` (imported, never evaluated). The current directory is
    searched first, so a user's ``my_rewards.py`` beside the data is found by ``my_rewards:fn``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not of the form module:function")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} (from {spec!r}): {e}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def load_task(spec: str) -> Task:
    """A built-in task by name, or ``module:attribute`` (a Task, or a function returning one)."""
    tasks = builtin_tasks()
    if spec in tasks:
        return tasks[spec]()
    if ":" not in spec:
        raise ValueError(f"unknown task {spec!r}; built-in: {', '.join(sorted(tasks))}, or module:function")
    obj = load_object(spec)
    if callable(obj) and not isinstance(obj, Task):
        obj = obj()
    if not isinstance(obj, Task):
        raise ValueError(f"{spec} is not a dpolab.tasks.Task (nor a function returning one)")
    return obj


def load_reward(spec: str) -> Reward:
    """A reward function: a built-in task's reward by task name, or ``module:function`` taking
    ``(prompt, completion)`` and returning a number."""
    if spec in builtin_tasks():
        return load_task(spec).reward
    obj = load_object(spec)
    if isinstance(obj, Task):
        return obj.reward
    if not callable(obj):
        raise ValueError(f"{spec} is not callable; a reward is a function (prompt, completion) -> float")
    return obj
