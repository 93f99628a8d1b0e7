"""Training: the train state, one sharded step that takes a loss function (which may own its depth
policy), the resumable loop with its logging and an optional schedule of phases, held-out
evaluation, optimizers and ahead-of-time compilation.

    result = rdlm.train.train(rdlm.load_config("configs/tiny.yaml"))
"""

from rdlm.errors import TrainingDiverged
from rdlm.train.loop import TrainResult, train
from rdlm.train.metrics import read_metrics
from rdlm.train.stages import SINGLE_PHASE, Schedule, StageSchedule
from rdlm.train.state import TrainState
from rdlm.train.step import DepthPolicy, lm_objective, make_train_step, train_step

__all__ = ["DepthPolicy", "SINGLE_PHASE", "Schedule", "StageSchedule", "TrainResult",
           "TrainState", "TrainingDiverged", "lm_objective", "make_train_step", "read_metrics",
           "train", "train_step"]
