"""Loops over the recurrent core, generic over the step function.

A step is a pure function ``step(consts, state) -> state``; ``consts`` holds everything the step
reads but does not change (core parameters, the prelude's embedding ``e``, the attention context).
Keeping ``consts`` explicit is what lets the no-gradient loop cut gradients with one
``stop_gradient`` instead of relying on closures.

No loop here is a Python loop over steps, and the number of steps is data: one compilation serves
every r (DESIGN principle 2). This module knows nothing about the model; `rdlm.model` supplies the
step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

State = TypeVar("State")
StepFn = Callable[[Any, State], State]


def iterate(step: StepFn, consts: Any, state: State, num_steps: int | jax.Array) -> State:
    """Apply ``step`` ``num_steps`` times. ``num_steps`` may be traced (one compile for all r).

    With a traced count this is a ``while_loop``, which JAX cannot reverse-differentiate: use it for
    inference and for the no-gradient part of training.
    """
    return lax.fori_loop(0, num_steps, lambda _, s: step(consts, s), state)


def iterate_no_grad(step: StepFn, consts: Any, state: State, num_steps: int | jax.Array) -> State:
    """`iterate` with gradients cut at the inputs, so nothing upstream sees these steps.

    With zero steps the state passes through untouched, gradient included.
    """
    out = iterate(step, lax.stop_gradient(consts), lax.stop_gradient(state), num_steps)
    return jax.tree.map(lambda o, s: jnp.where(num_steps > 0, lax.stop_gradient(o), s), out, state)


def iterate_with_grad(step: StepFn, consts: Any, state: State, num_steps: int | jax.Array,
                      max_steps: int, remat: bool = True, mask_skipped: bool = False,
                      policy: Callable[..., bool] | None = None) -> State:
    """Apply ``step`` ``num_steps <= max_steps`` times, differentiably, compiled once for all counts.

    A fixed-length ``scan`` of ``max_steps`` iterations. The steps past ``num_steps`` are skipped
    with a ``lax.cond``, or, with ``mask_skipped``, computed and discarded by a ``jnp.where``: the
    same values and gradients without the cond, whose residuals XLA copies through every
    iteration (docs/performance.md), at the price of computing the skipped
    steps — right when ``num_steps`` is almost always ``max_steps``. With ``remat`` each step is a
    ``jax.checkpoint`` so the backward pass stores one state per step instead of every activation
    inside it, plus whatever ``policy`` (a `jax.checkpoint_policies` entry) saves.
    """
    body = jax.checkpoint(step, policy=policy) if remat else step

    def scan_body(s: State, i: jax.Array) -> tuple[State, None]:
        if mask_skipped:
            new = body(consts, s)
            s = jax.tree.map(lambda n, o: jnp.where(i < num_steps, n, o), new, s)
        else:
            s = lax.cond(i < num_steps, lambda s_: body(consts, s_), lambda s_: s_, s)
        return s, None

    # Without remat every activation of every step is a residual: a rolled scan stacks them into
    # [max_steps, ...] buffers (zero-filled, written and read back by dynamic slices); unrolled,
    # they stay where they were computed (compile time grows with max_steps, never with r). With
    # remat a step's residual is one state, and the rolled loop compiles the step once.
    state, _ = lax.scan(scan_body, state, jnp.arange(max_steps), unroll=not remat)
    return state


def mostly_full_backprop(mean_recurrence: int, backprop_depth: int, slack: float = 0.25) -> bool:
    """Whether sampled depths almost always fill the backprop window: E[k − n_grad] <= ``slack``
    steps under `sample_depth`'s law. Then masking the rare skipped steps (`iterate_with_grad`'s
    ``mask_skipped``) costs less compute than the cond saves."""
    _, n_grad = expected_depth(int(mean_recurrence), int(backprop_depth))
    return backprop_depth - n_grad <= slack


def iterate_collect(step: StepFn, consts: Any, state: State, num_steps: int) -> tuple[State, State]:
    """Apply ``step`` a static ``num_steps`` times and also return every intermediate state.

    The trajectory has a static leading axis, so the count must be a Python int here (analysis
    runs compile once per r; training and sampling never need this).
    """
    if not isinstance(num_steps, (int, np.integer)):
        raise TypeError("return_trajectory=True needs num_steps as a Python int (the trajectory's "
                        f"length is a shape); got {type(num_steps).__name__}.")

    def scan_body(s: State, _: None) -> tuple[State, State]:
        s = step(consts, s)
        return s, s

    return lax.scan(scan_body, state, None, length=int(num_steps))


# ---------------------------------------------------------------------------------------------
# Randomised depth for training (SPEC §1 "Training objective").

DEPTH_SIGMA = 0.5


def sample_depth(key: jax.Array, mean_recurrence: int | jax.Array, backprop_depth: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Draw one recurrence count and split it into (n_no_grad, n_grad).

    rate ~ LogNormal(mu, 0.5) with mu = ln(mean) - 0.5**2 / 2, p = Poisson(rate) + 1;
    n_no_grad = max(p - k, 0), n_grad = min(k, p). Mean of p is mean + 1 (~33 for 32).
    Derive ``key`` from (seed, step) so every device and host draws the same r without talking.
    ``mean_recurrence`` may be traced (a recurrence curriculum): nothing here depends on its value
    at compile time.
    """
    k_rate, k_poisson = jax.random.split(key)
    mu = jnp.log(jnp.float32(mean_recurrence)) - DEPTH_SIGMA**2 / 2
    rate = jnp.exp(mu + DEPTH_SIGMA * jax.random.normal(k_rate, (), jnp.float32))
    p = jax.random.poisson(k_poisson, rate, (), dtype=jnp.int32) + 1
    n_no_grad = jnp.maximum(p - backprop_depth, 0)
    n_grad = jnp.minimum(backprop_depth, p)
    return n_no_grad, n_grad


@functools.lru_cache(maxsize=64)
def expected_depth(mean_recurrence: int, backprop_depth: int, num_samples: int = 200_000,
                   seed: int = 0) -> tuple[float, float]:
    """Monte-Carlo mean of (n_no_grad, n_grad) under `sample_depth`'s law (NumPy, deterministic;
    cached, since the train step and the FLOP accounting ask for it repeatedly)."""
    rng = np.random.default_rng(seed)
    mu = np.log(mean_recurrence) - DEPTH_SIGMA**2 / 2
    p = rng.poisson(rng.lognormal(mu, DEPTH_SIGMA, num_samples)) + 1
    return float(np.maximum(p - backprop_depth, 0).mean()), float(np.minimum(backprop_depth, p).mean())
