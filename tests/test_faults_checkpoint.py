"""Damaged checkpoints, made by damaging real checkpoint files: flipped bytes are caught by the
checksums saved with every checkpoint and refused by name; a run directory loads, and a training
run resumes from, its newest intact step, saying which step it skipped and why; the damaged step
is moved aside so that the run can save that step again; `sample`, `eval` and `convert` say which
step they loaded; orbax/tensorstore read errors become one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import rdlm
from rdlm.cli import convert, eval as eval_cli, main, sample
from rdlm.runtime import checkpoint
from rdlm.runtime.checkpoint import CheckpointError
from rdlm.runtime.integrity import MANIFEST
from rdlm.train import train
from tests.multihost import BASE_OVERRIDES, REPO, StepBatches

V0 = Path(__file__).parent / "data" / "checkpoints-v0"


def run_cfg(run_dir: Path, steps: int) -> rdlm.Config:
    # keep_last=3: the steps a resumed run writes stay beside the ones it resumed from.
    return rdlm.load_config(REPO / "configs/tiny.yaml", [
        *BASE_OVERRIDES, f"train.run_dir={run_dir}", f"train.steps={steps}",
        "train.checkpoint_every=2", "train.keep_last=3"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory with steps 2 and 4, saved asynchronously as `rdlm train` does."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(run_cfg(run, 4), data_iterator=StepBatches(8, 64), printer=lambda _: None)
    assert checkpoint.list_checkpoints(run) == [2, 4]
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run that a test may damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / str(step)


def flip_bytes(ckpt: Path, count: int = 64) -> Path:
    """XOR ``count`` bytes in the middle of the largest params data file (a few weights)."""
    data = ckpt / "params" / "ocdbt.process_0" / "d"
    target = max(data.iterdir(), key=lambda f: f.stat().st_size)
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + count] = bytes(b ^ 0xFF for b in raw[middle:middle + count])
    target.write_bytes(bytes(raw))
    return target


DAMAGE = {  # how a step gets damaged -> what the message says about it
    "flipped bytes": (flip_bytes, "does not match the sha256 checksum"),
    "metadata deleted": (lambda c: (c / "_CHECKPOINT_METADATA").unlink(),
                         "no record of its save finishing"),
    "params deleted": (lambda c: shutil.rmtree(c / "params"), "params/ item is missing"),
    "manifest deleted": (lambda c: (c / MANIFEST).unlink(), f"its {MANIFEST} is missing"),
}


# ---------------------------------------------------------------------------------------------
# The manifest.


def test_every_file_of_a_checkpoint_is_in_its_manifest(trained, tmp_path):
    """Async training saves and params-only saves alike commit a manifest that lists every item
    file with its size and sha256."""
    cfg, params = checkpoint.load_params(trained)
    checkpoint.save_params(tmp_path / "params-only", cfg, params)
    for ckpt in (step_dir(trained, 2), step_dir(trained, 4), tmp_path / "params-only"):
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = {f.relative_to(ckpt).as_posix(): f for f in ckpt.rglob("*")
                 if f.is_file() and f.parent != ckpt}
        assert set(manifest["files"]) == set(files)
        assert any(name.startswith("params/ocdbt.process_0/d/") for name in files)
        for name, f in files.items():
            assert manifest["files"][name] == {
                "bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}


def test_a_synchronous_save_has_its_manifest_when_save_returns(tmp_path):
    cfg = rdlm.load_config(REPO / "configs/tiny.yaml")
    ckpt = checkpoint.TrainCheckpointer(tmp_path, save_every=1, keep_last=2, keep_every=0,
                                        async_save=False)
    tree = {"w": np.arange(8, dtype=np.float32)}
    ckpt.save(1, cfg=cfg, params=tree, opt_state=tree, meta={"step": 1}, data_iterator=None)
    assert (tmp_path / "checkpoints" / "1" / MANIFEST).is_file()
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# Loading: an explicit damaged checkpoint is refused by name, a run directory falls back.


def test_flipped_bytes_are_refused_naming_the_step_and_the_file(run):
    """Before checksums, this loaded without error and sampled different tokens."""
    corrupted = flip_bytes(step_dir(run, 4))
    for load in (checkpoint.load_params, checkpoint.load_config):
        with pytest.raises(CheckpointError) as caught:
            load(step_dir(run, 4))
        message = str(caught.value)
        assert "\n" not in message
        assert repr(str(step_dir(run, 4))) in message and str(corrupted) in message
        assert "does not match the sha256 checksum" in message
        assert "pass the run directory to use its newest intact step" in message


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_run_directory_loads_its_newest_intact_step_and_says_so(trained, run, kind):
    damage, why = DAMAGE[kind]
    damage(step_dir(run, 4))
    lines: list[str] = []
    cfg, params = checkpoint.load_params(run, report=lines.append)
    assert len(lines) == 2 and lines[0].startswith(f"skipped step 4 ({step_dir(run, 4)}): ")
    assert why in lines[0]
    assert lines[1] == f"loaded step 2 from {step_dir(run, 2)}"
    assert checkpoint.load_config(run) == cfg  # the same step, quietly
    _, expected = checkpoint.load_params(step_dir(trained, 2))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(CheckpointError, match=f"'{step_dir(run, 4)}' cannot be loaded"):
        checkpoint.load_params(step_dir(run, 4))


def test_a_run_with_no_intact_step_is_refused_listing_why(run):
    flip_bytes(step_dir(run, 4))
    shutil.rmtree(step_dir(run, 2) / "params")
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*step 4: it is corrupt: "
                                              ".*step 2: it is incomplete"):
        checkpoint.load_params(run)


def test_sample_says_which_step_it_loaded_and_refuses_a_damaged_one(run, capsys):
    tokens = ["--tokens", "1,2,3", "--max-new-tokens", "2", "--json"]
    assert sample.cli(["--checkpoint", str(run), *tokens]) == 0
    assert f"loaded step 4 from {step_dir(run, 4)}\n" in capsys.readouterr().err
    flip_bytes(step_dir(run, 4))
    assert main(["sample", "--checkpoint", str(step_dir(run, 4)), *tokens]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: checkpoint '{step_dir(run, 4)}'")
    assert sample.cli(["--checkpoint", str(run), *tokens]) == 0
    err = capsys.readouterr().err
    assert f"skipped step 4 ({step_dir(run, 4)}): it is corrupt" in err
    assert f"loaded step 2 from {step_dir(run, 2)}\n" in err


def test_eval_and_convert_say_which_step_they_loaded(run, tmp_path, capsys):
    assert eval_cli.cli(["--checkpoint", str(run), "--task", "addition", "--num-steps", "1",
                         "--num-examples", "2"]) == 0
    assert f"loaded step 4 from {step_dir(run, 4)}\n" in capsys.readouterr().err
    flip_bytes(step_dir(run, 4))
    convert.cli(["rdlm-to-huginn", str(run), str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert f"skipped step 4 ({step_dir(run, 4)}): it is corrupt" in err
    assert f"loaded step 2 from {step_dir(run, 2)}\n" in err


# ---------------------------------------------------------------------------------------------
# Resuming training.


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_steps_are_set_aside_so_the_step_can_be_saved_again(run, kind):
    damage, why = DAMAGE[kind]
    damage(step_dir(run, 4))
    ckpt = checkpoint.TrainCheckpointer(run, save_every=2, keep_last=3, keep_every=0)
    lines: list[str] = []
    assert ckpt.set_aside_damaged(report=lines.append) == 2
    aside = run / checkpoint.DAMAGED_DIRNAME / "4"
    assert len(lines) == 1 and lines[0].startswith("skipped step 4: ")
    assert why in lines[0] and lines[0].endswith(f"; moved it to {aside}")
    assert aside.is_dir() and not step_dir(run, 4).exists()
    assert ckpt.latest_step() == 2
    cfg = rdlm.load_config(REPO / "configs/tiny.yaml")
    tree = {"w": np.ones(4, np.float32)}
    ckpt.save(4, cfg=cfg, params=tree, opt_state=tree, meta={"step": 4}, data_iterator=None)
    ckpt.close()
    assert checkpoint.list_checkpoints(run) == [2, 4]
    assert checkpoint.damage(step_dir(run, 4), None) is None


@pytest.mark.parametrize("kind", ["flipped bytes", "metadata deleted"])
def test_training_resumes_from_the_newest_intact_step(trained, run, kind):
    """Before: flipped bytes resumed into non-finite parameters; a deleted commit record made
    every rerun die with StepAlreadyExistsError when it came to save that step again."""
    damage, why = DAMAGE[kind]
    damage(step_dir(run, 4))
    lines: list[str] = []
    result = train(run_cfg(run, 6), data_iterator=StepBatches(8, 64), printer=lines.append)
    skipped = [line for line in lines if line.startswith("skipped step 4: ")]
    assert len(skipped) == 1 and why in skipped[0]
    assert any(f"resumed from {step_dir(run, 2)}" in line for line in lines)
    assert [h["step"] for h in result.history] == [3, 4, 5, 6]
    assert all(h["finite"] and np.isfinite(h["param_norm"]) for h in result.history)
    assert checkpoint.list_checkpoints(run) == [2, 4, 6]
    # Resumed from step 2 with the same data, step 4 is written again as it was at first.
    _, again = checkpoint.load_params(step_dir(run, 4))
    _, first = checkpoint.load_params(step_dir(trained, 4))
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(first)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Checkpoints from before checksums, and errors that orbax and tensorstore raise.


def test_checkpoints_without_checksums_load_with_a_note(tmp_path):
    shutil.copytree(V0, tmp_path / "v0")
    lines: list[str] = []
    checkpoint.load_params(tmp_path / "v0" / "run", report=lines.append)
    step = tmp_path / "v0" / "run" / "checkpoints" / "2"
    assert lines == [f"loaded step 2 from {step} (saved by an earlier rdlm without checksums: "
                     "its files could not be verified)"]
    assert not checkpoint.carries_checksums(step)


def test_read_errors_are_one_line_naming_the_path_and_the_fix(tmp_path, capfd):
    """A checkpoint without checksums whose data files are garbage: tensorstore's error, which
    runs to several lines of specs (followed by asyncio tracebacks), becomes one short line."""
    corrupt = Path(shutil.copytree(V0 / "params-only", tmp_path / "corrupt"))
    for f in (corrupt / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load_params(corrupt)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600
    assert message.startswith(f"could not restore 'params' from '{corrupt}'")
    assert "load another checkpoint, or match the model config" in message
    capfd.readouterr()
    assert main(["sample", "--checkpoint", str(corrupt), "--tokens", "1,2"]) == 2
    err = capfd.readouterr().err  # which read fails first varies: compare the line's form
    assert err.count("\n") == 1
    assert err.startswith(f"error: could not restore 'params' from '{corrupt}'")
    assert err.endswith("load another checkpoint, or match the model config.\n")
