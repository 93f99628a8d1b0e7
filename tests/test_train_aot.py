"""`python -m rdlm aot` and `python -m rdlm bench train` through their command lines, on the CPU
(the TPU path differs only in where the devices come from: `get_topology_desc`)."""

from __future__ import annotations

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


def test_aot_unknown_topology_is_a_clear_error(capsys):
    assert aot.cli(["configs/tiny.yaml", *SMALL, "--topology", "v5p:nonsense"]) == 2
    assert "cannot describe TPU topology 'v5p:nonsense'" in capsys.readouterr().err


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
