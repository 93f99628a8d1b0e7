"""The NaN guard's verdict: when a streak of non-finite steps stops the run, and the one
`TrainingDiverged` line that names the bad steps, the last good step and the checkpoint to
resume from. (The guard itself, dropping a non-finite update on device, is in
`rdlm.train.step`.)"""

from __future__ import annotations

from typing import Any

import numpy as np

from rdlm.config import Config
from rdlm.errors import TrainingDiverged
from rdlm.runtime import checkpoint as ckpt_lib
from rdlm.runtime import storage


def divergence_message(streak: int, step: int, max_bad_steps: int, saved_steps: list[int],
                       directory: storage.StoragePath, params_at_fault: bool) -> str:
    """What `TrainingDiverged` says: the bad steps, the last good step, and the checkpoint to
    resume from with a lower learning rate.

    All steps of a streak start from the last good step's params (bad updates are dropped). If
    only the updates were bad (their params' norm overflowed), those params are fine and a lower
    lr goes on from them. If the loss or gradient at those params was not finite
    (``params_at_fault``), the last good update made them finite but useless (a too large lr
    can: weights ~1e4 that saturate every softmax), and any lr fails on them again: the run has
    to go back to a checkpoint before them.
    """
    last_good = step - streak
    usable = [s for s in saved_steps if s < last_good or (s == last_good and not params_at_fault)]
    target = usable[-1] if usable else 0
    where = f"resume from checkpoint {directory / str(target)}" if usable else "start afresh"
    if saved_steps[-1:] == usable[-1:]:
        fix = f"rerun the same command to {where}"
    else:  # later checkpoints exist: name the one to go back to, the rerun deletes the others
        fix = f"rerun with train.resume_step={target} to {where}"
    cause, data_fix = "", ""
    if params_at_fault:
        cause = (f"; the loss or gradient at its params was not finite on the next {streak} "
                 "batches, so those params (a too large lr can leave them finite but useless) "
                 "or those batches are broken")
        data_fix = "; if the batches are, fix the data and rerun the same command"
    return (f"{streak} non-finite steps in a row (train.max_bad_steps={max_bad_steps}), steps "
            f"{last_good + 1}-{step}; stopping. The last good step is {last_good}{cause}. "
            f"Lower train.lr (or raise train.warmup_steps) and {fix}{data_fix}.")


def check_divergence(m: dict[str, Any], step: int, cfg: Config,
                     checkpointer: ckpt_lib.TrainCheckpointer, params_at_fault: bool) -> None:
    """`TrainingDiverged` once ``train.max_bad_steps`` steps in a row were bad."""
    tc = cfg.train
    if m["bad_streak"] < tc.max_bad_steps:
        return
    checkpointer.wait()  # a save of the last good step may still be in flight
    saved = list(ckpt_lib.list_checkpoints(checkpointer.directory.parent))
    raise TrainingDiverged(divergence_message(m["bad_streak"], step, tc.max_bad_steps, saved,
                                              checkpointer.directory, params_at_fault))


def loss_or_gradient_failed(records: list[dict[str, Any]]) -> bool:
    """Whether the loss or the gradient norm of any of these step records was not finite (the
    params were at fault, not just their update)."""
    return any(not (np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"])) for r in records)
