"""The task registry, difficulty levels and ``"knob=value"`` overrides: `make_task`."""

from __future__ import annotations

import typing
from typing import Any, Sequence

import yaml

from rdlm.data.tasks.addition import AdditionParams, AdditionTask
from rdlm.data.tasks.base import Task
from rdlm.data.tasks.chains import ChainsParams, ChainsTask
from rdlm.data.tasks.prontoqa import ProntoQAParams, ProntoQATask
from rdlm.data.tasks.prosqa import ProsQAParams, ProsQATask
from rdlm.errors import ConfigError

TASKS: dict[str, tuple[type, type]] = {
    "chains": (ChainsTask, ChainsParams),
    "addition": (AdditionTask, AdditionParams),
    "prosqa": (ProsQATask, ProsQAParams),
    "prontoqa": (ProntoQATask, ProntoQAParams),
}

# Level 1 is meant to be learnable in minutes on a CPU; the last level is the papers' setting.
DIFFICULTY: dict[str, dict[int, dict[str, Any]]] = {
    "chains": {
        # order="chain" (a task_args override) is easier still, but a positional shortcut
        # ("nearest digit before the query's definition") solves it: no level uses it.
        1: dict(num_chains=2, min_hops=1, max_hops=2, order="interleaved", query="any"),
        2: dict(num_chains=2, min_hops=2, max_hops=3, order="interleaved", query="any"),
        3: dict(num_chains=3, min_hops=2, max_hops=4, order="interleaved"),
        4: dict(num_chains=3, min_hops=2, max_hops=4, order="shuffled"),
        5: dict(num_chains=4, min_hops=3, max_hops=5, order="shuffled"),
    },
    "addition": {
        1: dict(min_digits=1, max_digits=2, reverse=True),
        2: dict(min_digits=1, max_digits=3, reverse=True),
        3: dict(min_digits=2, max_digits=4, reverse=False),
        4: dict(min_digits=3, max_digits=6, reverse=False),
        5: dict(min_digits=5, max_digits=10, reverse=False),
    },
    "prosqa": {
        1: dict(num_nodes=8, num_edges=9, min_hops=2, max_hops=3),
        2: dict(num_nodes=12, num_edges=16, min_hops=2, max_hops=4),
        3: dict(num_nodes=16, num_edges=24, min_hops=3, max_hops=5),
        4: dict(num_nodes=20, num_edges=30, min_hops=3, max_hops=6),
        5: dict(num_nodes=23, num_edges=36, min_hops=3, max_hops=6),
    },
    "prontoqa": {
        1: dict(min_hops=1, max_hops=2, distractors=1, shuffle_facts=False),
        2: dict(min_hops=2, max_hops=3, distractors=1, shuffle_facts=True),
        3: dict(min_hops=3, max_hops=4, distractors=1, shuffle_facts=True),
        4: dict(min_hops=4, max_hops=5, distractors=2, shuffle_facts=True),
        5: dict(min_hops=5, max_hops=5, distractors=2, shuffle_facts=True),
    },
}


def make_task(name: str, difficulty: int = 1, task_args: Sequence[str] = ()) -> Task:
    """The task ``name`` at a difficulty level, with ``"knob=value"`` overrides applied."""
    if name not in TASKS:
        raise ConfigError(f"data.task={name!r} is invalid: must be one of {sorted(TASKS)}.")
    levels = DIFFICULTY[name]
    if difficulty not in levels:
        raise ConfigError(f"data.difficulty={difficulty!r} is invalid: task {name!r} has levels "
                          f"{sorted(levels)}.")
    task_cls, params_cls = TASKS[name]
    values = dict(levels[difficulty])
    hints = typing.get_type_hints(params_cls)
    for item in task_args:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or key not in hints:
            raise ConfigError(f"data.task_args entry {item!r} is invalid: want knob=value with a "
                              f"knob of task {name!r} among {sorted(hints)}.")
        value = yaml.safe_load(raw)
        expected = hints[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"data.task_args {key}={raw!r} is invalid: expected "
                              f"{expected.__name__}.")
        values[key] = value
    return task_cls(params_cls(**values))
