"""Run schedules: what the train loop asks before and after each step, besides the step itself.

A schedule splits a run into phases and says, per step, whether the optimizer state starts
afresh, which labels go into the step's log record and checkpoint meta, and where a phase ends
(the loop saves and prints a line there). The plain run has one phase (`SINGLE_PHASE`); a
curriculum (continuous thought: one stage per number of latent steps) is a `StageSchedule`.

Step numbers here follow the loop: ``reset_optimizer(s)`` is asked before the step that takes
the state from s to s + 1 steps (so a run resumed at s asks it too), ``annotations(s)`` and
``phase_end(s)`` after s steps.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

# [(stage, steps)]: the stages in training order, each with its number of optimizer steps.
StagePlan = Sequence[tuple[int, int]]


class Schedule(Protocol):
    def reset_optimizer(self, step: int) -> bool:
        """True when the optimizer state is re-initialised before 0-based step ``step``."""

    def annotations(self, step: int) -> dict[str, int]:
        """Labels of step ``step`` (1-based: the step just run), logged with its metrics and
        saved in the meta of a checkpoint taken after it."""

    def phase_end(self, step: int) -> bool:
        """True after the last step of a phase that is not the run's last."""


@dataclasses.dataclass(frozen=True)
class _SinglePhase:
    """One phase: the optimizer state lives through the whole run."""

    def reset_optimizer(self, step: int) -> bool:
        return False

    def annotations(self, step: int) -> dict[str, int]:
        return {}

    def phase_end(self, step: int) -> bool:
        return False


SINGLE_PHASE: Schedule = _SinglePhase()


def stage_at(plan: StagePlan, step: int) -> tuple[int, int]:
    """(stage, index of the plan entry) of 0-based optimizer step ``step``; past the plan's end,
    its last stage."""
    end = 0
    for i, (stage, steps) in enumerate(plan):
        end += steps
        if step < end:
            return stage, i
    return plan[-1][0], len(plan) - 1


def is_stage_start(plan: StagePlan, step: int) -> bool:
    """True at the first step of every plan entry after the first."""
    end = 0
    for _, steps in plan[:-1]:
        end += steps
        if step == end:
            return True
    return False


@dataclasses.dataclass(frozen=True)
class StageSchedule:
    """A curriculum of stages: a fresh optimizer state at every stage change (the gradient
    statistics of one stage's data would mislead the next), the stage in every log record and
    checkpoint, and a checkpoint at every stage end."""

    plan: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.plan or any(steps < 1 for _, steps in self.plan):
            raise ValueError(f"a stage plan needs at least one stage of >= 1 steps: {self.plan}")

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.plan)

    def stage_at(self, step: int) -> int:
        """The stage of 0-based step ``step``."""
        return stage_at(self.plan, step)[0]

    def reset_optimizer(self, step: int) -> bool:
        return is_stage_start(self.plan, step)

    def annotations(self, step: int) -> dict[str, int]:
        return {"stage": self.stage_at(step - 1)}

    def phase_end(self, step: int) -> bool:
        return is_stage_start(self.plan, step)
