"""Rematerialisation: what each `ModelConfig.remat_policy` keeps for the backward pass, and
where `jax.checkpoint` goes (the core's gradient-carrying steps, and with every policy but
``core`` each prelude and coda block too). The layers name the values a policy may keep with
`checkpoint_name` (`rdlm.model.model`)."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
from flax import nnx

from rdlm.config import ModelConfig
from rdlm.model.attention import KV, AttentionContext
from rdlm.model.pallas_attention import SPLASH_LSE_NAME


# The weight matmuls' outputs, by the names the layers give them.
DOT_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp_gate", "mlp_up", "mlp_out", "adapter")
# Per policy, the named values a rematerialised region keeps (the rest is recomputed).
REMAT_SAVES: dict[str, tuple[str, ...]] = {
    "core": (),
    "full": (),
    "save_dots": DOT_NAMES,
    "save_attention_out": ("attention_out", SPLASH_LSE_NAME),
    "save_qkv_attention_out": ("query", "key", "value", "attention_out", SPLASH_LSE_NAME),
}


class RematPlan(NamedTuple):
    """Where `jax.checkpoint` goes and what it saves (``policy`` None: only the inputs)."""

    core: bool  # around each gradient-carrying core step
    blocks: bool  # around each prelude and coda block
    policy: Callable[..., bool] | None


def remat_plan(cfg: ModelConfig) -> RematPlan:
    """The `RematPlan` of ``cfg.remat`` and ``cfg.remat_policy``."""
    name = cfg.remat_policy if cfg.remat else "none"
    if name == "none":
        return RematPlan(False, False, None)
    saves = REMAT_SAVES[name]
    policy = jax.checkpoint_policies.save_only_these_names(*saves) if saves else None
    return RematPlan(core=True, blocks=name != "core", policy=policy)


def checkpointed_block(block: nnx.Module, policy: Callable[..., bool] | None
                        ) -> Callable[[jax.Array, AttentionContext], tuple[jax.Array, KV]]:
    """``block`` as a function rematerialised in the backward pass (saving what ``policy``
    allows): its parameters enter as arguments, so their gradients flow through the checkpoint."""
    graphdef, state = nnx.split(block)

    def apply(state: Any, x_btd: jax.Array, ctx: AttentionContext) -> tuple[jax.Array, KV]:
        return nnx.merge(graphdef, state)(x_btd, ctx)

    return functools.partial(jax.checkpoint(apply, policy=policy), state)
