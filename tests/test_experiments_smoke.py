"""Each experiment script end to end at a minuscule setting: trains through the library, evaluates,
and writes its report (table, command, configs) and plot."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = ["e1_test_time_scaling", "e2_fixed_depth_baselines", "e3_easy_to_hard",
           "e4_adaptive_exit", "e5_cache_sharing", "e6_continuous_cot", "e7_latent_trajectories",
           "e8_retrofit"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_experiment_smoke(name, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    module = importlib.import_module(name)
    out = tmp_path / "out"
    assert module.main(["--smoke", "--out", str(out), "--runs", str(tmp_path / "runs")]) == 0
    report = (out / f"{name}.md").read_text()
    assert "**Claim.**" in report and "**Result.**" in report and "## Reproduce" in report
    assert f"python experiments/{name}.py --smoke" in report
    assert "|---|" in report  # a table
    data = json.loads((out / f"{name}.json").read_text())
    assert data["name"] == name and data["wall_seconds"] > 0
    assert (out / f"{name}.png").stat().st_size > 1000
    # The run was trained by the library and left a complete checkpoint.
    assert any((tmp_path / "runs").glob("*/checkpoints/*/params"))
