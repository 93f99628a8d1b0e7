"""What every task shares: `Example`, splits by hash of the question, seeded generators, knob
checks, and `example_at` (index -> example)."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Protocol

from rdlm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: what is asked, the reasoning chain in language, and the exact answer."""

    question: str
    steps: tuple[str, ...]
    answer: str


# ---------------------------------------------------------------------------------------------
# Splits by hash of the question: disjoint by construction, independent of seeds and knobs.

SPLITS = ("train", "validation", "test")
_SPLIT_RANGES = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
MAX_ATTEMPTS = 1000


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) that depends only on ``text`` (stable across processes)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def split_of(question: str) -> str:
    """The split a question belongs to: train 80%, validation 10%, test 10% of the problem space."""
    u = _unit_hash(question)
    for split, (lo, hi) in _SPLIT_RANGES.items():
        if lo <= u < hi:
            return split
    raise AssertionError(u)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid: must be one of {SPLITS}.")


def seeded_rng(*parts: Any) -> random.Random:
    """A generator seeded by a stable hash of ``parts`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def require_knob(ok: bool, field: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"task knob {field}={value!r} is invalid: {valid}.")


def positive_knobs(params: Any, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        require_knob(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                       name, value, "must be a positive integer")


class Task(Protocol):
    """A problem generator: draws one random `Example` from ``rng``."""

    name: str
    params: Any

    def generate(self, rng: random.Random) -> Example: ...


def example_at(task: Task, split: str, index: int, seed: int = 0) -> Example:
    """The ``index``-th example of ``split``: a pure function of (task, params, split, seed, index)."""
    for attempt in range(MAX_ATTEMPTS):
        example = task.generate(seeded_rng(task.name, task.params, split, seed, index, attempt))
        if split_of(example.question) == split:
            return example
    raise ValueError(f"task {task.name!r} with {task.params} found no {split!r} problem in "
                     f"{MAX_ATTEMPTS} draws: its problem space is too small; raise the difficulty.")
