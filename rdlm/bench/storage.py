"""``python -m rdlm bench storage [CONFIG]``: checkpoint save and restore throughput (MB/s) of a
training state (params + optimizer state, as `TrainCheckpointer` writes it) to the local disk
and to local GCS and S3-compatible servers.

It catches regressions in the storage path (an extra copy, a listing per file); the emulators
run on this machine, so their numbers say nothing about Cloud Storage's speed. ``s3`` measures
an orbax save only once orbax can write there (see `rdlm.runtime.storage.require_array_store`);
until then it is reported as refused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from typing import Any

import jax
import numpy as np


def _state(config: str) -> tuple[Any, Any, int]:
    """(config, (params, opt_state), bytes) of a freshly initialised training state."""
    import rdlm
    from rdlm.train.optim import make_optimizer
    cfg = rdlm.load_config(config, [])
    params = rdlm.init_params(cfg.model, jax.random.key(0))
    opt_state = make_optimizer(cfg.train).init(params)
    nbytes = sum(x.nbytes for x in jax.tree.leaves((params, opt_state)) if hasattr(x, "nbytes"))
    return cfg, (params, opt_state), nbytes


def _time_round_trip(cfg: Any, state: Any, run_dir: str) -> tuple[float, float]:
    """Seconds to save one step (waited for, checksums included) and to restore it."""
    from rdlm.runtime.checkpoint import TrainCheckpointer
    params, opt_state = state
    ckpt = TrainCheckpointer(run_dir, save_every=0, keep_last=2, keep_every=0, async_save=False)
    try:
        t0 = time.perf_counter()
        ckpt.save(1, cfg=cfg, params=params, opt_state=opt_state, meta={"step": 1},
                  data_iterator=None)
        ckpt.wait()
        save_s = time.perf_counter() - t0
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                (params, opt_state))
        t0 = time.perf_counter()
        restored = ckpt.restore(1, abstract_params=abstract[0], abstract_opt_state=abstract[1])
        jax.block_until_ready(restored[:2])
        restore_s = time.perf_counter() - t0
    finally:
        ckpt.close()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return save_s, restore_s


def _target(kind: str, stack: contextlib.ExitStack) -> str:
    """A fresh run directory for ``kind`` ("local", "gs", "s3")."""
    if kind == "local":
        return stack.enter_context(tempfile.TemporaryDirectory())
    from rdlm.bench import emulators
    server = stack.enter_context(emulators.serve(kind))
    os.environ.update(server.environment())
    return f"{server.root}/bench"


def bench_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rdlm bench storage", description=__doc__)
    parser.add_argument("config", nargs="?", default="bench-28m")
    parser.add_argument("--targets", default="local,gs,s3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from rdlm.errors import StorageError
    cfg, state, nbytes = _state(args.config)
    mb = nbytes / 1e6
    results: dict[str, Any] = {}
    print(f"{args.config}: training state {mb:.1f} MB (params + optimizer state)")
    for kind in args.targets.split(","):
        with contextlib.ExitStack() as stack:
            root = _target(kind, stack)
            try:
                runs = [_time_round_trip(cfg, state, f"{root}/{i}") for i in range(args.repeats)]
            except StorageError as err:
                results[kind] = {"refused": str(err)}
                print(f"{kind:>6}: refused: {err}")
                continue
        save = float(np.median([r[0] for r in runs]))
        restore = float(np.median([r[1] for r in runs]))
        results[kind] = {"save_s": save, "restore_s": restore, "save_MB_per_s": mb / save,
                         "restore_MB_per_s": mb / restore}
        print(f"{kind:>6}: save {mb / save:8.1f} MB/s ({save:.2f} s)   "
              f"restore {mb / restore:8.1f} MB/s ({restore:.2f} s)   median of {args.repeats}")
    report = {"benchmark": "checkpoint save/restore throughput", "config": args.config,
              "state_MB": mb, "repeats": args.repeats, "results": results,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor() or platform.machine(),
                          "jax_backend": jax.default_backend(),
                          "note": "emulators run on this machine: regressions only, not "
                                  "cloud speeds"}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0
