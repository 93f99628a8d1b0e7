"""Run directories, checkpoints, data shards and conversion on object storage, against real local
servers that this module starts once (fake-gcs-server for ``gs://``, moto for ``s3://``, both on
127.0.0.1): nothing here reaches the internet.

- training on ``gs://`` is SIGKILLed, resumed from the bucket, and lands on the same bits as an
  uninterrupted run;
- two JAX processes with private temporary directories train into the bucket, and one process
  with 8 devices resumes from it;
- token shards are read from both stores, a checkpoint in the bucket is sampled from and
  converted to and from Hugging Face files;
- shards and a tokenizer prepared into the bucket train a run there, which is exported to
  Hugging Face files there, and nothing is uploaded when prepare fails;
- the lock is created only if absent on both stores;
- an unreachable endpoint, a missing bucket, absent credentials and checkpoints on ``s3://``
  each end in one ``error:`` line naming the URL and the setting.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import fsspec
import jax
import numpy as np
import pytest

import rdlm

from rdlm.bench import emulators
from rdlm.cli import main
from rdlm.runtime import checkpoint, sharding, storage
from rdlm.runtime import lock as lock_lib
from tests.multihost import (BASE_OVERRIDES, REPO, StepBatches, _assert_same_params,
                                        _free_port, _run, params_to_numpy, subprocess_env,
                                        text_config)
from tests.test_faults_train import TINY, quiet, tiny_cfg
from rdlm.train import read_metrics, train
from rdlm.train.eval import held_out_loss


@pytest.fixture(scope="session")
def stores() -> dict[str, emulators.Server]:
    """Both servers for the whole session, their settings in this process's environment (and
    so in the subprocesses' too)."""
    with contextlib.ExitStack() as stack:
        servers = {scheme: stack.enter_context(emulators.serve(scheme)) for scheme in ("gs", "s3")}
        saved = dict(os.environ)
        for server in servers.values():
            os.environ.update(server.environment())
        fsspec.config.set_conf_env(fsspec.config.conf)  # read at import, before these were set
        try:
            yield servers
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _params(result) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(result.state.params)]


# ---------------------------------------------------------------------------------------------
# Training into a bucket.


def test_sigkilled_training_resumes_from_the_bucket_to_the_same_bits(stores, tmp_path, jax_cache):
    run = f"{stores['gs'].root}/killed"
    cmd = [sys.executable, "-m", "rdlm", "train", str(TINY), "train.batch_size=8",
           "train.seq_len=64", "train.schedule=constant", "train.warmup_steps=2", "train.lr=0.003",
           "train.log_every=1", "train.progress=lines", "train.eval_every=0",
           "train.telemetry_every=0", f"train.run_dir={run}", "train.steps=100000",
           "train.checkpoint_every=2"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(1, jax_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            # Past step 4 with a checkpoint in the bucket (an asynchronous save may land a few
            # steps after the step it holds).
            logged = re.match(r"step (\d+)/", line)
            if logged and int(logged.group(1)) >= 4 and checkpoint.list_checkpoints(run):
                break
        else:
            raise AssertionError("training ended early:\n" + "".join(seen[-40:]))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    saved = list(checkpoint.list_checkpoints(run))
    assert saved and saved[-1] >= 2, saved
    assert storage.as_path(f"{run}/{lock_lib.LOCK_NAME}").exists()  # a kill keeps its lock
    assert not list(tmp_path.iterdir()), "the run wrote to the local disk"

    steps = saved[-1] + 2
    # The resumed run is a process of its own too: tensorboardX uploads its bucket event files
    # once more at interpreter exit, which must come while the store is still up.
    resumed = subprocess.run([*cmd[:-2], f"train.steps={steps}", "train.checkpoint_every=0"],
                             cwd=tmp_path, env=subprocess_env(1, jax_cache), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "took over the lock" in resumed.stdout + resumed.stderr  # same host, holder gone
    first = next(line for line in resumed.stdout.splitlines() if line.startswith("step "))
    assert first.startswith(f"step {saved[-1] + 1}/"), first
    straight = train(tiny_cfg(f"train.run_dir={tmp_path / 'straight'}", f"train.steps={steps}",
                              "train.checkpoint_every=0"), printer=quiet)
    for a, b in zip(jax.tree.leaves(checkpoint.load_params(run)[1]), _params(straight)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # A bucket's log is uploaded every 30 s and at the end: the kill may have lost the records
    # of its last 30 s, never those of the resumed steps, and no record is doubled.
    logged = {r["step"]: r["loss"] for r in read_metrics(f"{run}/metrics.jsonl")}
    expected = {h["step"]: h["loss"] for h in straight.history}
    assert set(range(saved[-1] + 1, steps + 1)) <= set(logged)
    assert all(logged[k] == expected[k] for k in logged)
    assert not storage.as_path(f"{run}/{lock_lib.LOCK_NAME}").exists()
    assert any(storage.as_path(f"{run}/tensorboard").iterdir())


def test_two_hosts_without_a_shared_disk_train_into_the_bucket(stores, tmp_path):
    """2 processes × 4 devices, each in its own private directory, checkpoint into the bucket
    (and generate and measure the held-out loss over both hosts' devices); one process with 8
    devices resumes from it to the numbers of an uninterrupted run."""
    run = f"{stores['gs'].root}/two-hosts"
    port = _free_port()
    homes = [tmp_path / f"host{i}" for i in range(2)]
    procs = []
    for i, home in enumerate(homes):
        home.mkdir()
        env = {**subprocess_env(4), "TMPDIR": str(home), "HOME": str(home)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.multihost", "worker", run, "3", "2x2x2",
             str(home / "multi3.npz"), str(i), "2", str(port)],
            cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    assert '"processes": 2' in outputs[0]
    # Generation over the two hosts' mesh gives each of them one device's tokens.
    assert all("GENERATION-OVER-HOSTS-OK" in out for out in outputs)
    assert checkpoint.list_checkpoints(run) == [3]
    ckpt = storage.as_path(f"{run}/checkpoints/3")
    # Each process wrote its own data-iterator state into the bucket, not onto its disk.
    assert sorted(p.name for p in (ckpt / "data_iter").iterdir() if p.suffix == ".json") == [
        "process_0-of-2.json", "process_1-of-2.json"]
    for home in homes:  # the text is the loss check's own data (below)
        assert {p.name for p in home.iterdir()} <= {"multi3.npz", "text"}, list(home.iterdir())

    out = _run([f"{run},{tmp_path / 'straight8'}", "6,6", "2x2x2",
                f"{tmp_path / 'resumed.npz'},{tmp_path / 'straight8.npz'}"], subprocess_env(8))
    assert '"processes": 1' in out and '"devices": 8' in out
    # Steps 1-3 summed over two hosts in gloo's order: equal to float32 rounding.
    straight8 = dict(np.load(tmp_path / "straight8.npz"))
    _assert_same_params(dict(np.load(tmp_path / "resumed.npz")), straight8, exact=False,
                        rtol=1e-6)

    # The 2-process checkpoint loads in this 1-device process too, as the model's params tree.
    cfg3, params3 = checkpoint.load_params(f"{run}/checkpoints/3")
    assert cfg3.mesh.fsdp == 2 and jax.tree.structure(params3) == jax.tree.structure(
        rdlm.abstract_params(cfg3.model))
    # The held-out loss over both hosts, each reading its rows, is one device's on all rows.
    losses = [json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines()
              if line.startswith("HELD-OUT-LOSS ")]
    assert [r["process"] for r in losses] == [0, 1] and losses[0]["loss"] == losses[1]["loss"]
    one = sharding.make_mesh(rdlm.MeshConfig(data=1), devices=jax.devices()[:1])
    alone = held_out_loss(params3, text_config(cfg3, homes[0] / "text"), num_steps_list=[1, 3],
                          num_batches=2, mesh=one)
    assert losses[0]["tokens"] == alone["tokens"] > 0, (losses[0], alone)
    np.testing.assert_allclose([losses[0]["loss"][str(r)] for r in (1, 3)],
                               [alone["loss"][r] for r in (1, 3)], rtol=2e-5)
    # 1 device, same config and data: equal to the 8-device run up to reduction order.
    cfg = rdlm.load_config(REPO / "configs/tiny.yaml", [
        *BASE_OVERRIDES, f"train.run_dir={tmp_path / 'one'}", "train.steps=6",
        "train.checkpoint_every=0", "mesh.data=1"])
    result = train(cfg, data_iterator=StepBatches(8, 64))
    _assert_same_params(params_to_numpy(result.state.params), straight8, exact=False, rtol=2e-5)
    for h in result.history:
        np.testing.assert_allclose(h["loss"], straight8[f"loss/{h['step']}"], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Data, sampling and conversion.


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_token_shards_are_read_from_a_bucket(stores, tmp_path, scheme):
    from rdlm.data.sources import ParquetDocSource, TokenWindowSource, expand_paths
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    local = tmp_path / "data"
    local.mkdir()
    np.save(local / "train-0.npy", rng.integers(0, 500, 1000).astype(np.uint16))
    rng.integers(0, 70000, 777).astype(np.uint32).tofile(local / "train-1.bin")
    (local / "train-1.bin.json").write_text('{"dtype": "uint32"}')
    docs = [list(range(n)) for n in (3, 7, 5)]
    pq.write_table(pa.table({"tokens": docs}), local / "docs.parquet")
    bucket = f"{stores[scheme].root}/shards"
    for f in local.iterdir():
        storage.copy_file(f, storage.as_path(f"{bucket}/{f.name}"))

    remote_files = [f for f in expand_paths([f"{bucket}/train-*"], "train")
                    if not f.endswith(".json")]
    assert remote_files == [f"{bucket}/train-0.npy", f"{bucket}/train-1.bin"]
    local_files = [str(local / "train-0.npy"), str(local / "train-1.bin")]
    remote, expected = TokenWindowSource(remote_files, 64), TokenWindowSource(local_files, 64)
    assert len(remote) == len(expected) == 999 // 64 + 776 // 64
    for i in range(len(expected)):
        np.testing.assert_array_equal(remote[i], expected[i])
    parquet = ParquetDocSource([f"{bucket}/docs.parquet"])
    assert [parquet[i].tolist() for i in range(3)] == docs


def test_sample_and_convert_with_a_checkpoint_in_the_bucket(stores, tmp_path, capsys):
    from tests.test_interop_huginn import huginn_tensors, write_checkpoint
    from rdlm.interop import load_huginn

    hf = write_checkpoint(tmp_path / "hf", huginn_tensors(seed=3))
    ckpt = f"{stores['gs'].root}/converted"
    assert main(["convert", "huginn-to-rdlm", str(hf), ckpt]) == 0
    config, params = checkpoint.load_params(ckpt)
    _, reference = load_huginn(hf)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
    assert main(["convert", "rdlm-to-huginn", ckpt, str(tmp_path / "back")]) == 0
    _, back = load_huginn(tmp_path / "back")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)

    local = tmp_path / "local-ckpt"
    checkpoint.save_params(local, config, params)
    capsys.readouterr()
    args = ["--tokens", "1,2,3", "--max-new-tokens", "4", "--num-steps", "2"]
    assert main(["sample", "--checkpoint", ckpt, *args]) == 0
    from_bucket = capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(local), *args]) == 0
    assert from_bucket.strip() and from_bucket == capsys.readouterr().out


def test_prepare_train_and_export_all_in_the_bucket(stores, tmp_path, jax_cache, capsys):
    from rdlm.interop import load_huginn

    root = f"{stores['gs'].root}/pipeline"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "abc def ghi " * (1 + i % 5)
                                   for i in range(40)))
    assert main(["prepare", str(corpus), "--tokenizer", "bpe:260", "--output", f"{root}/data",
                 "--shard-tokens", "1000"]) == 0
    meta = json.loads(storage.as_path(f"{root}/data/train.meta.json").read_text())
    assert meta["tokenizer"] == f"{root}/data/tokenizer.json" and len(meta["files"]) > 1
    assert sorted(storage.as_path(f"{root}/data").iterdir()) == sorted(
        storage.as_path(f"{root}/data/{name}")
        for name in [*meta["files"], "tokenizer.json", "train.meta.json"])

    run = f"{root}/run"  # its own process: see the resumed run above
    trained = subprocess.run(
        [sys.executable, "-m", "rdlm", "train", str(TINY), *BASE_OVERRIDES, "train.steps=2",
         "data.source=memmap", f"data.paths={root}/data/{{split}}-*.npy",
         f"data.tokenizer={meta['tokenizer']}", "model.vocab_size=260", f"train.run_dir={run}"],
        cwd=tmp_path, env=subprocess_env(1, jax_cache), capture_output=True, text=True,
        timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert checkpoint.list_checkpoints(run) == [2]

    hf = f"{root}/hf"
    assert main(["convert", "rdlm-to-huginn", run, hf]) == 0
    names = {f.name for f in storage.as_path(hf).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names, names
    local = tmp_path / "hf"
    local.mkdir()
    for name in names:
        storage.copy_file(storage.as_path(f"{hf}/{name}"), local / name)
    assert (local / "tokenizer.json").read_bytes() == storage.as_path(
        meta["tokenizer"]).read_bytes()  # the run's, from the bucket
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 load_huginn(local)[1], checkpoint.load_params(run)[1])

    # Errors: one line naming the URL and the setting; nothing uploaded when prepare fails.
    capsys.readouterr()
    assert main(["prepare", str(corpus), "--tokenizer", "chars", "--output",
                 "gs://no-such-bucket/data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output='gs://no-such-bucket/data'") and err.count("\n") == 1
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["prepare", str(tmp_path / "empty.txt"), "--tokenizer", "bpe:260", "--output",
                 f"{root}/empty"]) == 2
    assert "no documents" in capsys.readouterr().err
    assert not storage.glob(f"{root}/empty*")


# ---------------------------------------------------------------------------------------------
# The lock, and the errors.


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_lock_object_is_created_only_if_absent(stores, scheme):
    path = storage.as_path(f"{stores[scheme].root}/locks/{scheme}/.lock")
    assert storage.create_exclusive(path, b"first")
    assert not storage.create_exclusive(path, b"second")
    assert path.read_bytes() == b"first"

    run = f"{stores[scheme].root}/held"
    holder = lock_lib.LockInfo(pid=1, host="another-host", started="2026-01-01T00:00:00Z")
    storage.as_path(run).mkdir(parents=True, exist_ok=True)
    assert storage.create_exclusive(lock_lib.lock_path(run), _lock_bytes(holder))
    with pytest.raises(lock_lib.RunDirLocked, match="another-host"):
        lock_lib.acquire(run, note=quiet)


def _lock_bytes(info: lock_lib.LockInfo) -> bytes:
    import dataclasses
    import json
    return json.dumps(dataclasses.asdict(info)).encode()


def _train_error(monkeypatch, capsys, run_dir: str, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    t0 = time.monotonic()
    assert main(["train", str(TINY), f"train.run_dir={run_dir}", "train.steps=1"]) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "step 1/" not in err
    return lines[0]


def test_storage_errors_are_one_line_naming_the_url_and_the_setting(stores, monkeypatch, capsys):
    gs, s3 = stores["gs"], stores["s3"]
    line = _train_error(monkeypatch, capsys, f"{gs.root}/run",
                        STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{emulators.free_port()}")
    assert f"train.run_dir='{gs.root}/run'" in line and "STORAGE_EMULATOR_HOST" in line, line
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gs.endpoint)

    line = _train_error(monkeypatch, capsys, "gs://no-such-bucket/run")
    assert "gs://no-such-bucket does not exist" in line and "train.run_dir" in line, line

    line = _train_error(monkeypatch, capsys, "s3://no-such-bucket/run")
    assert "s3://no-such-bucket does not exist" in line, line

    line = _train_error(monkeypatch, capsys, f"{s3.root}/run")
    assert "checkpoints cannot be written to s3://" in line and "train.run_dir" in line, line

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    fsspec.filesystem("s3").clear_instance_cache()  # credentials are read when a client starts
    line = _train_error(monkeypatch, capsys, f"{s3.root}/run")
    assert "no credentials" in line and "AWS_ACCESS_KEY_ID" in line, line
