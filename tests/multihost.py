"""Helpers of the sharded and multi-process training tests, on fake CPU devices: a data
iterator with known batches, the run settings they share, and the worker that trains a run in a
process of its own (tests/test_storage.py: two JAX processes × 4 devices with gloo collectives
train into a bucket and generate over both hosts' devices, one process × 8 devices resumes; the
other tests reuse the pieces).

The device count is fixed when JAX starts, so the sharded runs are subprocesses of this file
(``python -m tests.multihost worker …``); several runs share one worker process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# XLA flags of every test process. Test programs are tiny, so XLA's backend optimisation and the
# CPU fusion emitters (MLIR code generation of each fusion) buy nothing at run time and cost most
# of the compile time, which is most of the suite's time.
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(num_devices: int) -> str:
    """XLA_FLAGS of a test process on ``num_devices`` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={num_devices} {CHEAP_COMPILE}"

# Shared with tests/test_train.py so that in-process runs reuse one compiled step.
BASE_OVERRIDES = ["train.batch_size=8", "train.seq_len=64", "train.schedule=constant",
                  "train.warmup_steps=2", "train.lr=0.003", "train.log_every=1",
                  "train.progress=lines", "train.eval_every=0", "train.telemetry_every=0"]


class StepBatches:
    """Deterministic batches in one global order: batch i is a function of i only, and process p
    of P takes rows [p·B/P, (p+1)·B/P). Its state ({"index": i}) is therefore the same on every
    process, so a run may resume with a different process count."""

    def __init__(self, batch_size: int, seq_len: int, process_index: int = 0,
                 process_count: int = 1, vocab: int = 16, bad_steps: tuple[int, ...] = ()):
        self.batch_size, self.seq_len, self.vocab = batch_size, seq_len, vocab
        self.rows = slice(process_index * batch_size // process_count,
                          (process_index + 1) * batch_size // process_count)
        self.bad_steps = bad_steps  # 1-based steps whose batch holds out-of-vocabulary ids
        self.index = 0

    def __iter__(self) -> "StepBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(1000 + self.index)
        # Sorted rows: a pattern a tiny model learns within a few steps.
        tokens = np.sort(rng.integers(0, self.vocab, (self.batch_size, self.seq_len + 1)), axis=1)
        self.index += 1
        if self.index in self.bad_steps:
            tokens[:, 0] = 10**6  # an id far outside the vocabulary: its embedding is NaN
        tokens = tokens[self.rows].astype(np.int32)
        ones = np.ones_like(tokens[:, 1:])
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
                "loss_mask": ones}

    def get_state(self) -> dict[str, int]:
        return {"index": self.index}

    def set_state(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])


def subprocess_env(num_devices: int, cache_dir: Path | str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags(num_devices)
    env["PYTHONPATH"] = str(REPO)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def params_to_numpy(params) -> dict[str, np.ndarray]:
    import jax
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


# ---------------------------------------------------------------------------------------------
# Worker (runs in a subprocess).


def check_generation_over_hosts(cfg, params) -> None:
    """`rdlm.generate` over the run's mesh, which spans every process (lockstep, the batch split;
    depth-continuous, a group of 2 rows per data × fsdp coordinate, the weights split over
    tensor), gives every process the tokens one device gives; so does task accuracy over it."""
    import jax
    import rdlm
    from jax.experimental import multihost_utils
    from rdlm.runtime.sharding import make_mesh
    mesh = make_mesh(cfg.mesh)
    local = jax.device_get(multihost_utils.process_allgather(params, tiled=True))
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [3, 3], [2, 5, 7], [9], [1, 1, 1], [8, 6]]
    common = dict(max_new_tokens=4, num_steps=3, exit="kl")
    for layout in ({}, {"continuous_batching": True}):
        over = rdlm.generate(params, cfg.model, prompts, mesh=mesh, **common, **layout,
                             **({"batch_size": 8} if layout else {}))
        alone = rdlm.generate(local, cfg.model, prompts, **common, **layout,
                              **({"batch_size": 2} if layout else {}))
        np.testing.assert_array_equal(over.tokens, alone.tokens)
        np.testing.assert_array_equal(over.steps, alone.steps)
    # Task accuracy (`rdlm eval --mesh`) decodes the same answers over the hosts.
    from rdlm.generation.evaluate import evaluate_accuracy
    task = dict(num_steps_list=[2], num_examples=8, continuous_batching=True)
    over = evaluate_accuracy(params, cfg, batch_size=8, mesh=mesh, **task)
    alone = evaluate_accuracy(local, cfg, batch_size=2, **task)
    assert over["predictions"] == alone["predictions"], (over["predictions"], alone["predictions"])
    print("GENERATION-OVER-HOSTS-OK", flush=True)


def text_config(cfg, directory: Path):
    """``cfg`` reading a token stream written into ``directory`` (the same on every host): 16
    windows of the run's batch shape in each of its train and test splits."""
    import dataclasses
    directory.mkdir(exist_ok=True)
    stream = np.random.default_rng(5).integers(0, 16, 16 * (cfg.train.seq_len + 1))
    for split in ("train", "test"):
        np.save(directory / f"{split}-00000.npy", stream.astype(np.int32))
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source="memmap", paths=(f"{directory}/{{split}}-*.npy",)))


def held_out_loss_over_hosts(cfg, params) -> None:
    """`rdlm eval`'s held-out loss over the run's mesh, which spans every process: each reads
    its rows of each batch. Printed for the test to compare with one device's."""
    import jax
    from rdlm.runtime.sharding import make_mesh
    from rdlm.train.eval import held_out_loss
    result = held_out_loss(params, text_config(cfg, Path.cwd() / "text"), num_steps_list=[1, 3],
                           num_batches=2, mesh=make_mesh(cfg.mesh))
    print("HELD-OUT-LOSS " + json.dumps({"process": jax.process_index(), **result}), flush=True)


def worker(argv: list[str]) -> None:
    """worker RUN_DIR STEPS MESH OUT.npz [PROCESS_ID NUM_PROCESSES PORT]

    RUN_DIR, STEPS and OUT may be comma-separated lists: several runs in one process."""
    if "," in argv[0]:
        for run_dir, steps, out in zip(*(a.split(",") for a in (argv[0], argv[1], argv[3]))):
            worker([run_dir, steps, argv[2], out, *argv[4:]])
        return
    run_dir, steps, mesh, out = argv[0], int(argv[1]), argv[2], argv[3]
    overrides = [*BASE_OVERRIDES, f"train.run_dir={run_dir}", f"train.steps={steps}",
                 "train.checkpoint_every=3"]
    data, fsdp, tensor = mesh.split("x")
    overrides += [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]
    process_id, num_processes = 0, 1
    if len(argv) > 4:
        process_id, num_processes, port = int(argv[4]), int(argv[5]), argv[6]
        overrides += [f"mesh.coordinator_address=127.0.0.1:{port}",
                      f"mesh.num_processes={num_processes}", f"mesh.process_id={process_id}"]
    import rdlm
    from rdlm.runtime.distributed import maybe_initialize_distributed
    from rdlm.train import train
    cfg = rdlm.load_config(REPO / "configs/tiny.yaml", overrides)
    maybe_initialize_distributed(cfg.mesh)
    import jax
    assert jax.process_count() == num_processes, jax.process_count()
    data_iter = StepBatches(cfg.train.batch_size, cfg.train.seq_len, jax.process_index(),
                            jax.process_count())
    result = train(cfg, data_iterator=data_iter)
    arrays = params_to_numpy(result.state.params)
    if num_processes > 1:
        check_generation_over_hosts(cfg, result.state.params)
        held_out_loss_over_hosts(cfg, result.state.params)
    if jax.process_index() == 0:
        losses = {f"loss/{h['step']}": np.float32(h["loss"]) for h in result.history}
        np.savez(out, **arrays, **losses)
    print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                      "mesh": {k: int(v) for k, v in
                               rdlm.runtime.sharding.make_mesh(cfg.mesh).shape.items()}}), flush=True)


# ---------------------------------------------------------------------------------------------
# Tests.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], env: dict[str, str], timeout: int = 240) -> str:
    proc = subprocess.run([sys.executable, "-m", "tests.multihost", "worker", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _assert_same_params(a: dict, b: dict, *, exact: bool, rtol: float = 0.0) -> None:
    keys = sorted(k for k in a if not k.startswith("loss/"))
    assert keys == sorted(k for k in b if not k.startswith("loss/"))
    for k in keys:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=rtol, err_msg=k)


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2:])
