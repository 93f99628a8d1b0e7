"""FLOP accounting that counts every unrolled recurrence step.

Conventions (those of MFU reports such as PaLM's and MaxText's): a multiply-add is 2 FLOPs; the
backward pass costs twice the forward; rematerialisation is *not* counted (it is overhead, not model
work); attention scores and the weighted sum are counted over the full ``seq_len`` keys (the
blocked causal attention computes 5/8 of that at 4 blocks, which MFU therefore slightly
flatters). No-gradient recurrence steps cost their forward only.
"""

from __future__ import annotations

from rdlm.config import ModelConfig
from rdlm.model.recurrence import expected_depth


def block_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one block (either family) for one token with ``seq_len`` keys."""
    d, m, kv = cfg.d_model, cfg.mlp_dim, cfg.kv_heads * cfg.head_dim
    matmuls = 2 * (d * d + 2 * d * kv + d * d + 2 * d * m + m * d)  # q, k/v, proj, fc, mlp proj
    attention = 2 * 2 * seq_len * d  # q·k over seq_len keys, then p·v
    return float(matmuls + attention)


def core_step_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one recurrence step: the adapter (2d → d) and the core blocks."""
    return 2.0 * 2 * cfg.d_model * cfg.d_model + cfg.n_core * block_flops_per_token(cfg, seq_len)


def outer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs outside the recurrence: prelude, coda and the tied output head."""
    head = 2.0 * cfg.d_model * cfg.vocab_size
    shift = 2.0 * cfg.token_shift * cfg.d_model * cfg.d_model  # the optional token shift
    return (cfg.n_prelude + cfg.n_coda) * block_flops_per_token(cfg, seq_len) + head + shift


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, num_steps: float) -> float:
    """Forward FLOPs per token at ``num_steps`` recurrence steps."""
    return outer_flops_per_token(cfg, seq_len) + num_steps * core_step_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, n_no_grad: float, n_grad: float) -> float:
    """Training FLOPs per token: forward + backward (3×) for everything with gradient, forward
    only (1×) for the ``n_no_grad`` steps."""
    core = core_step_flops_per_token(cfg, seq_len)
    return 3.0 * (outer_flops_per_token(cfg, seq_len) + n_grad * core) + n_no_grad * core


def expected_train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """`train_flops_per_token` averaged over the randomised depth (cfg.mean_recurrence,
    cfg.backprop_depth)."""
    n_no_grad, n_grad = expected_depth(cfg.mean_recurrence, cfg.backprop_depth)
    return train_flops_per_token(cfg, seq_len, n_no_grad, n_grad)
