"""Config validation, presets, YAML loading, parameter and FLOP accounting, depth sampling."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import rdlm
from rdlm import flops


def test_huginn_parameter_count():
    cfg = rdlm.model_preset("huginn-3.5b")
    assert rdlm.count_params(cfg) == 3_564_976_800
    core = rdlm.abstract_params(cfg)["core"]["blocks"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(core)) == 1_581_592_320


def test_invalid_model_values_name_the_field():
    with pytest.raises(rdlm.ConfigError, match=r"model.d_model=100.*divisible by model.n_heads=3"):
        rdlm.ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(rdlm.ConfigError, match="model.n_core=0"):
        rdlm.ModelConfig(n_core=0)
    with pytest.raises(rdlm.ConfigError, match="model.dtype='float16'.*one of"):
        rdlm.ModelConfig(dtype="float16")
    with pytest.raises(rdlm.ConfigError, match="unknown model preset 'tinyy'.*'tiny'"):
        rdlm.model_preset("tinyy")


def test_load_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  d_model: 64\nseed: 3\n")
    cfg = rdlm.load_config(path, ["model.n_heads=8", "model.dtype=bfloat16", "mesh.data=2"])
    assert cfg.model.d_model == 64 and cfg.model.n_heads == 8 and cfg.model.vocab_size == 64
    assert cfg.model.dtype == "bfloat16" and cfg.mesh.data == 2 and cfg.seed == 3
    hash(cfg)  # frozen: usable as a static jit argument


def test_unknown_keys_suggest_the_closest(tmp_path):
    with pytest.raises(rdlm.ConfigError, match=r"'model.d_modle'.*did you mean 'd_model'"):
        rdlm.load_config(None, ["model.d_modle=128"])
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  d_model: 64\n")
    with pytest.raises(rdlm.ConfigError, match=r"'modle'.*did you mean 'model'"):
        rdlm.load_config(path)
    with pytest.raises(rdlm.ConfigError, match="expected an integer"):
        rdlm.load_config(None, ["model.d_model=abc"])
    with pytest.raises(rdlm.ConfigError, match="expected a number"):
        rdlm.load_config(None, ["model.rope_base=fast"])
    assert rdlm.load_config(None, ["model.rope_base=1e4"]).model.rope_base == 1e4
    with pytest.raises(rdlm.ConfigError, match="section.key=value"):
        rdlm.load_config(None, ["model.d_model"])
    with pytest.raises(rdlm.ConfigError, match="does not exist"):
        rdlm.load_config(tmp_path / "missing.yaml")


def test_sample_depth_distribution():
    keys = jax.random.split(jax.random.key(0), 4000)
    n_no_grad, n_grad = jax.vmap(lambda k: rdlm.sample_depth(k, 32, 8))(keys)
    total = np.asarray(n_no_grad + n_grad)
    assert abs(total.mean() - 33) < 1.0  # SPEC: mean ≈ 33
    assert 27 <= np.median(total) <= 31  # SPEC: median ≈ 29
    assert np.all(np.asarray(n_grad) <= 8) and np.all(total >= 1)
    assert np.all((np.asarray(n_no_grad) == 0) | (np.asarray(n_grad) == 8))
    mean_no_grad, mean_grad = rdlm.expected_depth(32, 8)
    assert abs(mean_no_grad + mean_grad - total.mean()) < 1.0
    # Same key, same depth: every host agrees without communication.
    a = rdlm.sample_depth(jax.random.fold_in(jax.random.key(1), 7), 32, 8)
    b = rdlm.sample_depth(jax.random.fold_in(jax.random.key(1), 7), 32, 8)
    assert [int(x) for x in a] == [int(x) for x in b]


def test_flops_count_every_iteration():
    cfg = rdlm.model_preset("bench-28m")
    seq = 256
    step = flops.core_step_flops_per_token(cfg, seq)
    assert flops.forward_flops_per_token(cfg, seq, 10) - flops.forward_flops_per_token(cfg, seq, 4) == pytest.approx(6 * step)
    # Matmul FLOPs per token are 2 × the weights touched; attention adds 4·seq·d per layer.
    blocks = cfg.n_prelude + cfg.n_coda + 4 * cfg.n_core
    p = rdlm.abstract_params(cfg)
    n_matmul = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p) if x.ndim >= 2)
    n_core_matmul = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p["core"]) if x.ndim >= 2)
    n_qk_bias = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p) if x.ndim == 4 and x.shape[0] == 2)
    n_core_bias = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p["core"]) if x.ndim == 4 and x.shape[0] == 2)
    weights_at_r4 = (n_matmul - n_qk_bias) + 3 * (n_core_matmul - n_core_bias)
    expected = 2 * weights_at_r4 + blocks * 4 * seq * cfg.d_model
    assert flops.forward_flops_per_token(cfg, seq, 4) == pytest.approx(expected)
    # No-gradient steps cost their forward only, gradient steps forward + backward.
    assert (flops.train_flops_per_token(cfg, seq, 5, 4) - flops.train_flops_per_token(cfg, seq, 4, 4)
            == pytest.approx(step))
    assert (flops.train_flops_per_token(cfg, seq, 4, 5) - flops.train_flops_per_token(cfg, seq, 4, 4)
            == pytest.approx(3 * step))
    assert flops.expected_train_flops_per_token(cfg, seq) > flops.train_flops_per_token(cfg, seq, 0, 4)


def test_presets_are_valid_and_replaceable():
    for name in ("tiny", "huginn-3.5b", "bench-28m"):
        cfg = rdlm.model_preset(name)
        assert cfg.d_model % cfg.n_heads == 0
    assert rdlm.model_preset("tiny", d_model=64).d_model == 64
    with pytest.raises(rdlm.ConfigError):
        dataclasses.replace(rdlm.model_preset("tiny"), n_heads=5)


def test_sample_exit_is_checked_against_the_criteria():
    from rdlm.config import EXIT_CRITERIA, SampleConfig
    from rdlm.generation.exits import DEFAULT_THRESHOLDS
    assert sorted(EXIT_CRITERIA) == sorted(DEFAULT_THRESHOLDS)  # the config's literal list
    assert SampleConfig(exit="kl:5e-4").exit == "kl:5e-4"
    with pytest.raises(rdlm.ConfigError, match=r"sample\.exit='kll'.*did you mean 'kl'"):
        SampleConfig(exit="kll")
    with pytest.raises(rdlm.ConfigError, match=r"sample\.exit='kl:abc'.*positive number"):
        SampleConfig(exit="kl:abc")
