"""Held-out loss at several r and latent-state telemetry, both jitted once (r is data)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rdlm.config import Config
from rdlm.model import forward, token_loss_sums
from rdlm.train.step import Batch, global_batch


def make_eval_fn(cfg: Config, mesh: Mesh) -> Callable:
    """(params, batch, r) → (summed token loss, token count); one compilation for every r."""
    def eval_loss(params: Any, batch: Batch, num_steps: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = forward(params, batch["inputs"], cfg.model, num_steps=num_steps,
                            key=jax.random.key(cfg.seed + 1), segment_ids=batch.get("segment_ids"),
                            branch_ids=batch.get("branch_ids"))
        sums = token_loss_sums(logits, batch["targets"], batch.get("loss_mask"))
        return sums["nll"], sums["num_tokens"]
    return jax.jit(eval_loss)


def latent_telemetry(params: Any, tokens_bt: jax.Array, cfg: Config, num_steps: int
                     ) -> dict[str, jax.Array]:
    """Health of the recurrence (SPEC §1): convergence ‖s_k − s_{k−1}‖/‖s_k‖ at the last step and
    on average, ‖s_k‖ per token, and the mean cosine similarity between different tokens' final
    states (→ 1 means the states collapsed)."""
    _, aux = forward(params, tokens_bt, cfg.model, num_steps=num_steps,
                     key=jax.random.key(cfg.seed + 2), return_trajectory=True)
    traj_rbtd = aux["trajectory"].astype(jnp.float32)
    norm_rbt = jnp.linalg.norm(traj_rbtd, axis=-1)
    delta_rbt = jnp.linalg.norm(traj_rbtd[1:] - traj_rbtd[:-1], axis=-1) / (norm_rbt[1:] + 1e-9)
    final_btd = aux["state"].astype(jnp.float32)
    unit_btd = final_btd / (jnp.linalg.norm(final_btd, axis=-1, keepdims=True) + 1e-9)
    cos_btt = jnp.einsum("btd,bsd->bts", unit_btd, unit_btd)
    t = cos_btt.shape[-1]
    off_diag = (cos_btt.sum((-1, -2)) - jnp.trace(cos_btt, axis1=-2, axis2=-1)) / max(t * (t - 1), 1)
    return {"latent/rel_change_last": delta_rbt[-1].mean(),
            "latent/rel_change_mean": delta_rbt.mean(),
            "latent/state_norm": jnp.linalg.norm(final_btd, axis=-1).mean(),
            "latent/token_correlation": off_diag.mean()}



def run_eval(eval_fn: Callable, params: Any, eval_batches: list[dict[str, np.ndarray]],
             cfg: Config, mesh: Mesh) -> dict[str, float]:
    """Mean token loss over ``eval_batches`` at each r in ``train.eval_steps``."""
    out = {}
    batches = [global_batch(b, cfg, mesh) for b in eval_batches]
    for r in cfg.train.eval_steps:
        total = count = 0.0
        for b in batches:
            s, n = eval_fn(params, b, jnp.int32(r))
            total, count = total + float(s), count + float(n)
        out[f"eval/loss_r{r}"] = total / max(count, 1.0)
    return out
