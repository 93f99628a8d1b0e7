"""The checkpoint format: params-only round trip, run-directory resolution, clear errors for
missing, half-written and incomplete checkpoints, the data-iterator item, and checkpoints written
by earlier versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm.runtime import checkpoint
from rdlm.runtime.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = rdlm.load_config("configs/tiny.yaml", ["model.d_model=16", "model.n_heads=2"])
    params = rdlm.init_params(cfg.model, jax.random.key(3))
    path = tmp_path_factory.mktemp("ckpt") / "params"
    checkpoint.save_params(path, cfg, params)
    return cfg, params, path


def test_params_round_trip_exactly(saved):
    cfg, params, path = saved
    cfg2, params2 = checkpoint.load_params(path)
    assert cfg2 == cfg
    # Same tree (int keys of the block lists included) and bitwise-equal arrays.
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    assert 0 in params2["core"]["blocks"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_params_load_as_bfloat16_whatever_the_checkpoint_stores(saved, tmp_path):
    """float32 params saved, bfloat16 loaded (and a bfloat16 checkpoint, as `rdlm convert
    --param-dtype bfloat16` writes, loads as float32 unless asked)."""
    cfg, params, path = saved
    _, half = checkpoint.load_params(path, dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(half)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    checkpoint.save_params(tmp_path / "half", cfg, half)
    for dtype in ("float32", "bfloat16"):
        _, loaded = checkpoint.load_params(tmp_path / "half", dtype=dtype)
        assert {str(x.dtype) for x in jax.tree.leaves(loaded)} == {dtype}
    with pytest.raises(ValueError, match="float32, bfloat16"):
        checkpoint.load_params(path, dtype="float16")


def test_load_from_a_relative_path(saved, monkeypatch):
    cfg, params, path = saved
    monkeypatch.chdir(path.parent)
    _, params2 = checkpoint.load_params(path.name)
    np.testing.assert_array_equal(params2["wte"], params["wte"])


def test_restore_into_given_shardings(saved):
    from rdlm.runtime import sharding
    cfg, params, path = saved
    mesh = sharding.make_mesh(cfg.mesh)
    shardings = sharding.param_shardings(cfg.model, mesh)
    _, params2 = checkpoint.load_params(path, shardings=shardings)
    assert params2["wte"].sharding == shardings["wte"]


def test_save_refuses_to_overwrite(saved):
    cfg, params, path = saved
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.save_params(path, cfg, params)


def test_run_directory_resolves_to_latest_complete_step(saved, tmp_path):
    cfg, params, path = saved
    steps = tmp_path / "run" / "checkpoints"
    for step in (5, 10):
        shutil.copytree(path, steps / str(step))
    # A half-written save (orbax temporary) and an incomplete directory are skipped.
    shutil.copytree(path, steps / "15.orbax-checkpoint-tmp-1234")
    shutil.copytree(path, steps / "20")  # copied in part: orbax's record of the commit is missing
    (steps / "20" / "_CHECKPOINT_METADATA").unlink()
    assert checkpoint.list_checkpoints(tmp_path / "run") == [5, 10]
    assert checkpoint.resolve(tmp_path / "run") == steps / "10"
    assert checkpoint.resolve(steps) == steps / "10"
    with pytest.raises(CheckpointError, match="half-written"):
        checkpoint.load_params(steps / "15.orbax-checkpoint-tmp-1234")
    with pytest.raises(CheckpointError, match="incomplete"):
        checkpoint.load_params(steps / "20")


def test_missing_and_corrupt_checkpoints_raise_clear_errors(saved, tmp_path):
    cfg, params, path = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_params(tmp_path / "nope")
    # A save killed before it finished leaves only orbax's temporary beside the path.
    shutil.copytree(path, tmp_path / "killed.orbax-checkpoint-tmp-1234")
    with pytest.raises(CheckpointError, match="was never finished"):
        checkpoint.load_params(tmp_path / "killed")
    with pytest.raises(CheckpointError, match="no complete checkpoint found"):
        checkpoint.load_params(tmp_path)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    for f in (corrupt / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    # Caught by the saved checksums (file sizes first) before orbax reads a byte.
    with pytest.raises(CheckpointError, match="cannot be loaded: it is corrupt: .* has 7 bytes"):
        checkpoint.load_params(corrupt)


def test_old_configs_with_unknown_data_or_train_keys_still_load():
    from rdlm.config import Config, ConfigError
    from rdlm.config_files import to_dict
    saved = to_dict(Config())
    saved["data"]["renamed_option"] = 1
    with pytest.warns(UserWarning, match="renamed_option"):
        assert checkpoint.config_from_json(saved) == Config()
    saved["model"]["not_a_model_field"] = 1  # the model decides shapes: never guessed
    with pytest.raises(ConfigError, match="not_a_model_field"), pytest.warns(UserWarning):
        checkpoint.config_from_json(saved)


def test_data_iterator_state_is_in_grains_own_layout(tmp_path):
    """grain's orbax handler restores the data_iter item of a run on the same number of hosts."""
    import grain
    from etils import epath
    from rdlm.data import make_train_iterator
    cfg = rdlm.load_config("configs/tiny.yaml", ["train.seq_len=32"])
    it = make_train_iterator(cfg)
    next(it), next(it)
    ckpt = checkpoint.TrainCheckpointer(tmp_path, save_every=1, keep_last=1, keep_every=0,
                                        async_save=False)
    tree = {"w": np.ones(2, np.float32)}
    ckpt.save(2, cfg=cfg, params=tree, opt_state=tree, meta={"step": 2}, data_iterator=it)
    ckpt.close()
    expected = next(it)
    resumed = make_train_iterator(cfg)
    grain.checkpoint.CheckpointHandler().restore(
        epath.Path(tmp_path / "checkpoints" / "2" / checkpoint.DATA_ITER),
        args=grain.checkpoint.CheckpointRestore(item=resumed))
    got = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


V0 = Path(__file__).parent / "data" / "checkpoints-v0"


def test_checkpoints_written_before_the_runtime_layer_load_and_resume(tmp_path):
    from rdlm.runtime import sharding
    from rdlm.train.optim import make_optimizer
    from rdlm.train.state import abstract_state, state_shardings
    shutil.copytree(V0, tmp_path / "v0")
    run = tmp_path / "v0" / "run"
    cfg, params = checkpoint.load_params(tmp_path / "v0" / "params-only")
    run_cfg, run_params = checkpoint.load_params(run)
    assert run_cfg.model == cfg.model
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(run_params)):
        np.testing.assert_array_equal(a, b)

    # The training checkpoint resumes: params, optimizer state, counters and the data position.
    ckpt = checkpoint.TrainCheckpointer(run, save_every=1, keep_last=3, keep_every=0,
                                        async_save=False)
    assert ckpt.latest_step() == 2
    tx = make_optimizer(run_cfg.train)
    target = abstract_state(run_cfg, tx, state_shardings(run_cfg, tx,
                                                         sharding.make_mesh(run_cfg.mesh)))
    restored, opt_state, meta, data_state = ckpt.restore(
        2, abstract_params=target.params, abstract_opt_state=target.opt_state)
    assert meta == {"step": 2, "bad_steps": 0, "bad_streak": 0}
    assert data_state == {"next_index": 2}
    np.testing.assert_array_equal(restored["wte"], run_params["wte"])

    # The run goes on in the current format beside the old step.
    ckpt.save(3, cfg=run_cfg, params=restored, opt_state=opt_state, meta=dict(meta, step=3),
              data_iterator=None)
    ckpt.close()
    assert checkpoint.list_checkpoints(run) == [2, 3]
    assert checkpoint.load_params(run)[1]["wte"].shape == run_params["wte"].shape
