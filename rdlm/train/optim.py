"""Optimizers and learning-rate schedules for training (optax).

Two optimizers share one structure (clip → adaptive scaling → weight decay → −lr):
- ``adamw``: optax's Adam scaling with ε; the usual baseline.
- ``huginn``: the Huginn-0125 recipe (SPEC §1): Adam-atan2 — ``atan2(m̂, √v̂)`` replaces
  ``m̂ / (√v̂ + ε)``, which is bounded and scale-invariant, so no ε is needed — followed by a
  per-tensor cap on the update's RMS, so one tensor's spike cannot take a giant step.
Weight decay is decoupled (applied to the weights, scaled by the schedule's lr as in AdamW) and
skips norm weights and the q/k bias. ``train.freeze`` leaves parts of the model out of the chain.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rdlm.config import TrainConfig

# atan2(x, 1) ≈ x near 0; the scale 4/π makes atan2's range (−π/2, π/2) map onto (−2, 2), the
# constant of Everett et al. (2024) that the Huginn code uses.
ATAN2_SCALE = 4.0 / math.pi


def make_schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``lr``, then constant, cosine (to ``min_lr_ratio·lr``) or trapezoid."""
    warmup = min(tcfg.warmup_steps, tcfg.steps)
    rest = max(tcfg.steps - warmup, 1)
    floor = tcfg.lr * tcfg.min_lr_ratio
    if tcfg.schedule == "constant":
        after = optax.constant_schedule(tcfg.lr)
    elif tcfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(tcfg.lr, rest, alpha=tcfg.min_lr_ratio)
    else:  # trapezoid (warm-up, stable, decay): the decay covers the last decay_fraction of steps
        decay = max(int(round(tcfg.steps * tcfg.decay_fraction)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(tcfg.lr), optax.linear_schedule(tcfg.lr, floor, decay)],
            [stable])
    if warmup == 0:
        return after
    # Warm-up starts at lr/warmup, not 0: step 0 should already move the weights.
    return optax.join_schedules(
        [optax.linear_schedule(tcfg.lr / warmup, tcfg.lr, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: matrices and embeddings, not norms or the q/k bias."""
    def wants_decay(path: tuple[Any, ...], leaf: Any) -> bool:
        names = [getattr(k, "key", None) for k in path]
        return leaf.ndim >= 2 and "qk_bias" not in names
    return jax.tree_util.tree_map_with_path(wants_decay, params)


# The top-level entries of the params tree, by the `TrainConfig.FREEZABLE` part they belong to
# ("core" holds the adapter and the recurrent blocks, told apart one level down).
_PARTS = {"wte": "embeddings", "token_shift": "embeddings", "prelude": "prelude",
          "coda": "coda", "ln_f": "head", "lm_head": "head"}


def param_part(path: tuple[Any, ...]) -> str:
    """The freezable part (`TrainConfig.FREEZABLE`) of the parameter at ``path``."""
    names = [getattr(k, "key", None) for k in path]
    if names[0] == "core":
        return "adapter" if names[1] == "adapter" else "core"
    if names[0] not in _PARTS:
        raise ValueError(f"parameter {'/'.join(map(str, names))} belongs to no part of "
                         f"train.freeze; add its top-level name to rdlm.train.optim._PARTS.")
    return _PARTS[names[0]]


def freeze_labels(params: Any, freeze: tuple[str, ...]) -> Any:
    """"frozen" or "trained" for every leaf of ``params`` (the labels of `make_optimizer`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if param_part(path) in freeze else "trained", params)


def stop_frozen(params: Any, freeze: tuple[str, ...]) -> Any:
    """``params`` with the gradient cut at the frozen parts: their gradients are zeros that XLA
    never computes (no backward pass through a frozen prelude whose inputs need none)."""
    if not freeze:
        return params
    return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == "frozen" else p,
                        params, freeze_labels(params, freeze))


def apply_updates(params: Any, updates: Any, freeze: tuple[str, ...]) -> Any:
    """`optax.apply_updates`, with the frozen parts' arrays passed through as they were: their
    update is zero, but p + 0 would still turn a -0.0 into +0.0."""
    new = optax.apply_updates(params, updates)
    if not freeze:
        return new
    return jax.tree.map(lambda n, p, label: p if label == "frozen" else n, new, params,
                        freeze_labels(params, freeze))


class ScaleByAdamAtan2State(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_atan2(b1: float, b2: float, scale: float = ATAN2_SCALE
                        ) -> optax.GradientTransformation:
    """Adam with ``scale·atan2(m̂, √v̂)`` as the direction: no ε, bounded per coordinate."""
    def init(params: Any) -> ScaleByAdamAtan2State:
        zeros = lambda p: jnp.zeros_like(p, jnp.float32)
        return ScaleByAdamAtan2State(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                                     jax.tree.map(zeros, params))

    def update(grads: Any, state: ScaleByAdamAtan2State, params: Any = None
               ) -> tuple[Any, ScaleByAdamAtan2State]:
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
        c1 = 1 - b1 ** count.astype(jnp.float32)
        c2 = 1 - b2 ** count.astype(jnp.float32)
        updates = jax.tree.map(lambda m, v: scale * jnp.arctan2(m / c1, jnp.sqrt(v / c2)), mu, nu)
        return updates, ScaleByAdamAtan2State(count, mu, nu)

    return optax.GradientTransformation(init, update)


def clip_update_rms(max_rms: float) -> optax.GradientTransformation:
    """Per tensor: u ← u / max(1, rms(u) / max_rms) (Adafactor-style update clipping)."""
    def update(updates: Any, state: optax.EmptyState, params: Any = None
               ) -> tuple[Any, optax.EmptyState]:
        del params
        def clip(u: jax.Array) -> jax.Array:
            rms = jnp.sqrt(jnp.mean(jnp.square(u.astype(jnp.float32))))
            return u / jnp.maximum(1.0, rms / max_rms).astype(u.dtype)
        return jax.tree.map(clip, updates), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """The optax chain for ``tcfg.optimizer`` with ``make_schedule(tcfg)``."""
    parts: list[optax.GradientTransformation] = []
    if tcfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(tcfg.grad_clip))
    if tcfg.optimizer == "adamw":
        parts.append(optax.scale_by_adam(b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps))
    else:
        parts.append(scale_by_adam_atan2(tcfg.b1, tcfg.b2))
        if tcfg.update_clip > 0:
            parts.append(clip_update_rms(tcfg.update_clip))
    if tcfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(tcfg.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(make_schedule(tcfg)))
    tx = optax.chain(*parts)
    if not tcfg.freeze:
        return tx
    # Frozen parts get a zero update, and the chain (clipping norm, moments, weight decay) sees
    # only the trained ones: no moments are kept for what never moves.
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()},
                                 lambda params: freeze_labels(params, tcfg.freeze))
