"""(b) Multi-digit addition ``123+45`` -> ``168`` (optionally reversed digits), with the
column-by-column carries as reasoning steps."""

from __future__ import annotations

import dataclasses
import random

from rdlm.data.tasks.base import Example, positive_knobs, require_knob


@dataclasses.dataclass(frozen=True)
class AdditionParams:
    """Operands with [min_digits, max_digits] digits; ``reverse`` writes the answer least
    significant digit first (the order the carries are computed in: easier to learn)."""

    min_digits: int = 1
    max_digits: int = 3
    reverse: bool = False

    def __post_init__(self) -> None:
        positive_knobs(self, "min_digits", "max_digits")
        require_knob(self.min_digits <= self.max_digits, "min_digits", self.min_digits,
                       f"must be <= max_digits={self.max_digits}")
        require_knob(self.max_digits <= 30, "max_digits", self.max_digits, "must be <= 30")


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    params: AdditionParams = AdditionParams()
    name: str = "addition"

    def generate(self, rng: random.Random) -> Example:
        p = self.params
        a, b = (_random_number(rng, rng.randint(p.min_digits, p.max_digits)) for _ in range(2))
        steps, carry = [], 0
        da, db = str(a)[::-1], str(b)[::-1]
        for i in range(max(len(da), len(db))):
            x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total}")
            carry = total // 10
        answer = str(a + b)
        return Example(f"{a}+{b}", tuple(steps), answer[::-1] if p.reverse else answer)


def _random_number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)
