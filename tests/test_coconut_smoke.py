"""The experiment script end to end at smoke size: trains, evaluates, probes, writes its report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_coconut_prosqa_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("coconut_prosqa",
                                                  ROOT / "experiments" / "coconut_prosqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--fresh", "--out", str(tmp_path / "out"),
                        "--runs", str(tmp_path / "runs")]) == 0
    report = json.loads((tmp_path / "out" / "coconut_prosqa.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    assert methods == {"Coconut"}
    coconut = next(r for r in report["rows"] if r["method"] == "Coconut")
    # Coconut's count includes its K·c = 1 thought on top of at least one language token.
    assert coconut["generated_tokens"] >= 2 and 0.0 <= coconut["accuracy"] <= 1.0
    assert report["probes"] and (tmp_path / "out" / "coconut_prosqa.png").stat().st_size > 0
    assert "| backbone | method |" in (tmp_path / "out" / "coconut_prosqa.md").read_text()
