"""`python -m rdlm aot` and `python -m rdlm bench train` through their command lines, on the CPU
(the TPU path differs only in where the devices come from: `get_topology_desc`)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from rdlm.bench.train import bench_cli
from rdlm.cli import aot

SMALL = ["model.d_model=16", "model.n_heads=2", "model.mlp_dim=32", "model.n_core=1",
         "model.backprop_depth=2", "model.mean_recurrence=3", "train.batch_size=2",
         "train.seq_len=16"]


def test_aot_reports_memory_and_flops_for_local_devices(tmp_path, capsys):
    out = tmp_path / "aot.json"
    assert aot.cli(["configs/tiny.yaml", *SMALL, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "arguments (params, optimizer state, batch)" in text and "model FLOPs per step" in text
    report = json.loads(out.read_text())
    assert report["devices"] == 1 and report["argument_bytes"] > 0
    assert report["peak_bytes"] >= report["argument_bytes"]
    assert report["fits"] is None  # no HBM size for a CPU
    assert report["xla_flops"] > 0 and report["model_flops"] > 0


def test_aot_compiles_the_llama_block(tmp_path, capsys):
    out = tmp_path / "aot.json"
    llama = ["model.block=llama", "model.qk_bias=false", "model.n_kv_heads=1",
             "model.tie_embeddings=false"]
    assert aot.cli(["configs/tiny.yaml", *SMALL, *llama, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["xla_flops"] > 0 and report["model_flops"] > 0


def test_aot_unknown_topology_is_a_clear_error(capsys):
    assert aot.cli(["configs/tiny.yaml", *SMALL, "--topology", "v5p:nonsense"]) == 2
    assert "cannot describe TPU topology 'v5p:nonsense'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed")
def test_aot_without_libtpu_says_how_to_install_it(capsys):
    assert aot.cli(["configs/tiny.yaml", *SMALL, "--topology", "v5p:2x2x1"]) == 2
    err = capsys.readouterr().err
    assert "needs libtpu, which is not installed" in err and 'pip install "jax[tpu]==' in err


def test_aot_that_does_not_fit_names_the_memory_and_settings_that_use_less(tmp_path, capsys):
    out = tmp_path / "aot.json"
    assert aot.cli(["configs/tiny.yaml", *SMALL, "--hbm-gib", "1e-4", "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "error: does not fit: peak" in err and "temporaries" in err
    assert "model.remat_policy=full" in err  # the default policy keeps prelude/coda activations
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["toolchain"]["jax"] and report["machine"]


def test_biggest_arrays_of_a_lowered_train_step():
    """What a refused program's message names: the largest arrays of the traced step, largest
    first (here the [vocab, d] embedding's gradient and optimizer moments and the logits)."""
    from rdlm.config_files import load_config
    from rdlm.runtime import sharding as shard_lib
    from rdlm.train import aot as aot_lib
    from rdlm.train.step import make_train_step
    from rdlm.train.optim import make_optimizer
    from rdlm.train.state import abstract_state, state_shardings
    import jax
    cfg = load_config("configs/tiny.yaml", SMALL)
    mesh = shard_lib.make_mesh(cfg.mesh, devices=jax.devices())
    tx = make_optimizer(cfg.train)
    state = abstract_state(cfg, tx, state_shardings(cfg, tx, mesh))
    batch = aot_lib.abstract_batch(cfg, mesh)
    text = make_train_step(cfg, mesh, batch_keys=tuple(batch)).lower(state, batch).as_text()
    biggest = aot_lib.largest_arrays(text, n=3)
    sizes = [size for _, _, size in biggest]
    assert len(biggest) == 3 and sizes == sorted(sizes, reverse=True)
    logits = 2 * 16 * cfg.model.vocab_size * 4  # [batch, seq, vocab] float32
    assert sizes[0] >= logits
    message = aot_lib.does_not_fit_message("RESOURCE_EXHAUSTED: Ran out of memory on HBM.\nmore",
                                           cfg, 1, text)
    assert message.startswith("the train step does not fit in device memory: RESOURCE_EXHAUSTED")
    assert biggest[0][1] in message and "Settings that use less" in message


def test_bench_one_compilation_serves_every_depth(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_cli(["configs/tiny.yaml", "--recurrence", "1,6", *SMALL,  # any order
                                "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["compilations"] == 1 and report["host_cores"] >= 1 and report["host_cpu"]
    assert [r["r"] for r in report["results"]] == [3, 1, 6]
    assert [(r["n_no_grad"], r["n_grad"]) for r in report["results"]] == [(1, 2), (0, 1), (4, 2)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in report["results"])
    assert "tokens/s" in capsys.readouterr().out
