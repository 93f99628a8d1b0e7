"""Adaptive-exit criteria for per-token recurrence (SPEC "Inference features").

A criterion compares the latest recurrence step of a token with the previous *evaluated* step and
says, per row, whether the token has converged. Criteria and default thresholds (exit when the
value falls below the threshold; argmax-stability exits when the argmax has stayed the same for
``threshold`` consecutive evaluations):

==================  =====================================================  =========
name                value                                                  default
==================  =====================================================  =========
kl                  KL(p_prev ‖ p_cur) of the coda's next-token distribution   1e-3
                    (p_prev starts uniform)
minp-kl             the same KL after min-p filtering (probabilities below     1e-5
                    ``min_p`` · max are set to 1/V, then renormalised)
entropy-diff        |H(p_cur) − H(p_prev)| (H_prev starts at log V)            1e-3
latent-diff         ‖s_t − s_{t−1}‖ / ‖s_t‖                                      0.03
cosine              1 − cos(s_t, s_{t−1})                                        1e-3
argmax-stability    consecutive evaluations with an unchanged argmax             5
==================  =====================================================  =========

The distribution criteria need the coda's logits at every evaluated step: the sampler runs the coda
on the candidate state (as the reference implementation does); the latent criteria do not.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rdlm.errors import ConfigError

DEFAULT_THRESHOLDS: dict[str, float] = {
    "kl": 1e-3,
    "minp-kl": 1e-5,
    "entropy-diff": 1e-3,
    "latent-diff": 0.03,
    "cosine": 1e-3,
    "argmax-stability": 5,
}
LOGIT_CRITERIA = frozenset({"kl", "minp-kl", "entropy-diff", "argmax-stability"})


@dataclasses.dataclass(frozen=True)
class ExitConfig:
    """When a token may stop iterating.

    ``min_steps``: no exit before this many steps. ``check_every``: evaluate the criterion only on
    steps that are multiples of it (the comparison is with the previous evaluated step), which
    saves the coda's cost for the distribution criteria. The cap is the ``num_steps`` of the call.
    """

    criterion: str = "kl"
    threshold: float | None = None  # None: the criterion's default
    min_steps: int = 1
    check_every: int = 1
    min_p: float = 0.1  # filter of "minp-kl"

    def __post_init__(self) -> None:
        if self.criterion not in DEFAULT_THRESHOLDS:
            close = difflib.get_close_matches(self.criterion, DEFAULT_THRESHOLDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown exit criterion {self.criterion!r}{hint}; valid criteria: "
                             f"{sorted(DEFAULT_THRESHOLDS)}.")
        value = self.value
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"exit threshold {value!r} for {self.criterion!r} must be a positive "
                             "number.")
        if self.criterion == "argmax-stability" and float(value) != int(value):
            raise ConfigError(f"argmax-stability takes a whole number of steps, got {value!r}.")
        for name in ("min_steps", "check_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"exit {name}={v!r} must be a positive integer.")
        if not 0.0 < self.min_p < 1.0:
            raise ConfigError(f"exit min_p={self.min_p!r} must be in (0, 1).")

    @property
    def value(self) -> float:
        """The threshold in force."""
        return DEFAULT_THRESHOLDS[self.criterion] if self.threshold is None else self.threshold

    @property
    def needs_logits(self) -> bool:
        return self.criterion in LOGIT_CRITERIA

    @classmethod
    def parse(cls, spec: str, **kwargs) -> "ExitConfig":
        """``"kl"``, ``"kl:5e-4"``, ``"argmax-stability:3"`` → ExitConfig."""
        name, _, raw = spec.partition(":")
        threshold = None
        if raw:
            try:
                threshold = float(raw)
            except ValueError:
                raise ConfigError(f"exit threshold {raw!r} in {spec!r} is not a number.") from None
        return cls(criterion=name.strip(), threshold=threshold, **kwargs)


def as_exit_config(exit: "ExitConfig | str | None") -> "ExitConfig | None":
    """Accept an ExitConfig, a ``"name[:threshold]"`` string, or None (fixed r)."""
    if exit is None or isinstance(exit, ExitConfig):
        return exit
    if isinstance(exit, str):
        return ExitConfig.parse(exit)
    raise TypeError(f"exit must be an ExitConfig, a 'criterion[:threshold]' string or None, "
                    f"got {type(exit).__name__}.")


class ExitState(NamedTuple):
    """What a criterion remembers of the previous evaluated step, per row."""

    logp_bv: jax.Array  # log p_prev (uniform at first)
    entropy_b: jax.Array
    argmax_b: jax.Array  # -1 at first: nothing to agree with
    stable_b: jax.Array  # consecutive evaluations with an unchanged argmax
    latent_bd: jax.Array  # state at the previous evaluation


def init_exit_state(state_bd: jax.Array, vocab_size: int) -> ExitState:
    b = state_bd.shape[0]
    return ExitState(
        logp_bv=jnp.full((b, vocab_size), -math.log(vocab_size), jnp.float32),
        entropy_b=jnp.full((b,), math.log(vocab_size), jnp.float32),
        argmax_b=jnp.full((b,), -1, jnp.int32),
        stable_b=jnp.zeros((b,), jnp.int32),
        latent_bd=state_bd.astype(jnp.float32))


def _minp_log_probs(logits_bv: jax.Array, min_p: float) -> jax.Array:
    """Min-p filtered distribution: tail probabilities replaced by 1/V, then renormalised."""
    probs_bv = jax.nn.softmax(logits_bv, axis=-1)
    tail_bv = probs_bv < min_p * probs_bv.max(-1, keepdims=True)
    probs_bv = jnp.where(tail_bv, 1.0 / logits_bv.shape[-1], probs_bv)
    return jnp.log(probs_bv / probs_bv.sum(-1, keepdims=True))


def _kl(logp_prev_bv: jax.Array, logp_bv: jax.Array) -> jax.Array:
    return jnp.sum(jnp.exp(logp_prev_bv) * (logp_prev_bv - logp_bv), axis=-1)


def evaluate(exit_cfg: ExitConfig, exit_state: ExitState, state_bd: jax.Array,
             logits_bv: jax.Array | None) -> tuple[jax.Array, jax.Array, ExitState]:
    """(value per row, converged per row, updated memory) for the state just computed.

    ``logits_bv`` (float32) is required for the distribution criteria and ignored otherwise.
    """
    name = exit_cfg.criterion
    state_bd = state_bd.astype(jnp.float32)
    new = exit_state._replace(latent_bd=state_bd)
    if name in ("latent-diff", "cosine"):
        prev_bd = exit_state.latent_bd
        norm_b = jnp.linalg.norm(state_bd, axis=-1)
        if name == "latent-diff":
            value_b = jnp.linalg.norm(state_bd - prev_bd, axis=-1) / jnp.maximum(norm_b, 1e-30)
        else:
            denom_b = jnp.maximum(norm_b * jnp.linalg.norm(prev_bd, axis=-1), 1e-30)
            value_b = 1.0 - jnp.sum(state_bd * prev_bd, -1) / denom_b
        return value_b, value_b < exit_cfg.value, new
    if logits_bv is None:
        raise ValueError(f"exit criterion {name!r} needs the coda's logits.")
    logits_bv = logits_bv.astype(jnp.float32)
    if name == "argmax-stability":
        argmax_b = jnp.argmax(logits_bv, -1).astype(jnp.int32)
        stable_b = jnp.where(argmax_b == exit_state.argmax_b, exit_state.stable_b + 1, 0)
        new = new._replace(argmax_b=argmax_b, stable_b=stable_b)
        return stable_b.astype(jnp.float32), stable_b >= int(exit_cfg.value), new
    if name == "minp-kl":
        logp_bv = _minp_log_probs(logits_bv, exit_cfg.min_p)
    else:
        logp_bv = jax.nn.log_softmax(logits_bv, -1)
    if name == "entropy-diff":
        entropy_b = -jnp.sum(jnp.exp(logp_bv) * logp_bv, -1)
        value_b = jnp.abs(entropy_b - exit_state.entropy_b)
        new = new._replace(entropy_b=entropy_b)
    else:
        value_b = _kl(exit_state.logp_bv, logp_bv)
        new = new._replace(logp_bv=logp_bv)
    return value_b, value_b < exit_cfg.value, new
