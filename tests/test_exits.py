"""Exit criteria: values on hand-made inputs, defaults, parsing and errors."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from rdlm.generation.exits import DEFAULT_THRESHOLDS, ExitConfig, as_exit_config, evaluate, init_exit_state

V = 8


def test_default_thresholds_follow_the_spec():
    assert DEFAULT_THRESHOLDS == {"kl": 1e-3, "minp-kl": 1e-5, "entropy-diff": 1e-3,
                                  "latent-diff": 0.03, "cosine": 1e-3, "argmax-stability": 5}
    assert ExitConfig("kl").value == 1e-3 and ExitConfig("kl", threshold=5e-4).value == 5e-4


def test_kl_starts_from_uniform_and_then_compares_steps():
    cfg = ExitConfig("kl")
    state = jnp.zeros((2, 4))
    memory = init_exit_state(state, V)
    logits = jnp.asarray([[0.0] * V, [3.0] + [0.0] * (V - 1)])
    value, converged, memory = evaluate(cfg, memory, state, logits)
    # Row 0 is uniform: KL(uniform || uniform) = 0. Row 1: KL(uniform || p) by hand.
    p = np.exp(np.asarray(logits[1])) / np.exp(np.asarray(logits[1])).sum()
    expected = np.sum((1 / V) * (np.log(1 / V) - np.log(p)))
    np.testing.assert_allclose(np.asarray(value), [0.0, expected], atol=1e-6)
    assert converged.tolist() == [True, False]
    value, converged, _ = evaluate(cfg, memory, state, logits)  # same distribution again
    np.testing.assert_allclose(np.asarray(value), [0.0, 0.0], atol=1e-6)
    assert converged.tolist() == [True, True]


def test_minp_kl_ignores_the_tail():
    cfg = ExitConfig("minp-kl")
    memory = init_exit_state(jnp.zeros((1, 4)), V)
    a = jnp.asarray([[5.0, 4.0] + [-5.0] * (V - 2)])
    b = jnp.asarray([[5.0, 4.0] + [-9.0] * (V - 2)])  # only the filtered tail moved
    _, _, memory = evaluate(cfg, memory, jnp.zeros((1, 4)), a)
    value, converged, _ = evaluate(cfg, memory, jnp.zeros((1, 4)), b)
    assert float(value[0]) < 1e-7 and bool(converged[0])
    plain = ExitConfig("kl")
    m = init_exit_state(jnp.zeros((1, 4)), V)
    _, _, m = evaluate(plain, m, jnp.zeros((1, 4)), a)
    assert float(evaluate(plain, m, jnp.zeros((1, 4)), b)[0][0]) > 1e-5


def test_entropy_difference():
    cfg = ExitConfig("entropy-diff")
    memory = init_exit_state(jnp.zeros((1, 4)), V)
    logits = jnp.asarray([[2.0, 1.0] + [0.0] * (V - 2)])
    value, _, memory = evaluate(cfg, memory, jnp.zeros((1, 4)), logits)
    p = np.exp(np.asarray(logits[0])) / np.exp(np.asarray(logits[0])).sum()
    entropy = -np.sum(p * np.log(p))
    np.testing.assert_allclose(float(value[0]), math.log(V) - entropy, rtol=1e-5)
    value, converged, _ = evaluate(cfg, memory, jnp.zeros((1, 4)), logits)
    assert float(value[0]) < 1e-6 and bool(converged[0])


def test_latent_criteria():
    start = jnp.asarray([[1.0, 0.0, 0.0, 0.0]])
    near = jnp.asarray([[1.0, 0.01, 0.0, 0.0]])
    diff = ExitConfig("latent-diff")
    memory = init_exit_state(start, V)
    value, converged, memory = evaluate(diff, memory, near, None)
    np.testing.assert_allclose(float(value[0]), 0.01 / float(jnp.linalg.norm(near)), rtol=1e-5)
    assert bool(converged[0])
    cos = ExitConfig("cosine")
    value, converged, _ = evaluate(cos, init_exit_state(start, V), near, None)
    np.testing.assert_allclose(float(value[0]), 1 - 1 / float(jnp.linalg.norm(near)), atol=1e-6)
    assert bool(converged[0])
    # From the zero state nothing has converged yet.
    value, converged, _ = evaluate(diff, init_exit_state(jnp.zeros((1, 4)), V), near, None)
    assert float(value[0]) == pytest.approx(1.0) and not bool(converged[0])


def test_argmax_stability_counts_consecutive_agreements():
    cfg = ExitConfig("argmax-stability", threshold=3)
    memory = init_exit_state(jnp.zeros((1, 4)), V)
    a = jnp.asarray([[1.0, 0.0] + [0.0] * (V - 2)])
    b = jnp.asarray([[0.0, 1.0] + [0.0] * (V - 2)])
    flags = []
    for logits in (a, a, b, b, b, b):
        value, converged, memory = evaluate(cfg, memory, jnp.zeros((1, 4)), logits)
        flags.append((int(value[0]), bool(converged[0])))
    assert flags == [(0, False), (1, False), (0, False), (1, False), (2, False), (3, True)]


def test_parsing_and_errors():
    assert as_exit_config("kl:5e-4") == ExitConfig("kl", threshold=5e-4)
    assert as_exit_config("argmax-stability:3").value == 3
    assert as_exit_config(None) is None
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        as_exit_config("cosin")
    with pytest.raises(ValueError, match="positive"):
        ExitConfig("kl", threshold=-1.0)
    with pytest.raises(ValueError, match="whole number"):
        ExitConfig("argmax-stability", threshold=2.5)
    with pytest.raises(ValueError, match="check_every"):
        ExitConfig("kl", check_every=0)
    with pytest.raises(TypeError):
        as_exit_config(3)
