"""The recurrent-depth model: architecture (`model`), its pure API on one params pytree
(`functional`), attention context and kernels, the loops over the core step (`recurrence`) and
FLOP accounting (`flops`).
"""

from rdlm.model import flops, recurrence
from rdlm.model.attention import (KV, AttentionContext, RowEntries, attention_context,
                                  rope_angles)
from rdlm.model.functional import (abstract_params, bind, core_step, count_params, forward,
                                   forward_train, group_sizes, init_params, initial_state, lm_loss,
                                   masked_token_loss, param_axes, token_loss_sums)
from rdlm.model.model import Params, RecurrentDepthLM, run_blocks
from rdlm.model.recurrence import expected_depth, sample_depth

__all__ = [
    "KV", "AttentionContext", "Params", "RecurrentDepthLM", "abstract_params", "attention_context",
    "bind", "core_step", "count_params", "expected_depth", "flops", "forward", "forward_train",
    "group_sizes", "init_params", "initial_state", "lm_loss", "masked_token_loss", "param_axes",
    "recurrence", "rope_angles", "RowEntries", "run_blocks", "sample_depth", "token_loss_sums",
]
