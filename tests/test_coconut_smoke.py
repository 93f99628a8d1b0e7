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
    # The symbols config (the shorter sequences keep the smoke run short; the words notation's
    # parsing is covered in test_tasks).
    assert module.main(["--smoke", "--fresh", "--out", str(tmp_path / "out"),
                        "--runs", str(tmp_path / "runs"),
                        "--config", "configs/coconut-prosqa-symbols.yaml"]) == 0
    report = json.loads((tmp_path / "out" / "coconut_prosqa_symbols.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    assert methods == {"Coconut"}
    coconut = next(r for r in report["rows"] if r["method"] == "Coconut")
    # Coconut's count includes its K·c = 1·2 thoughts on top of at least one language token.
    assert coconut["generated_tokens"] >= 3 and 0.0 <= coconut["accuracy"] <= 1.0
    assert report["probes"] and (tmp_path / "out" / "coconut_prosqa_symbols.png").stat().st_size > 0
    # The path probe: the 2-hop path's first node, the answer and the other option at each thought.
    (path,) = report["path_probes"].values()
    assert set(path) == {"path node 1", "the answer (last path node)", "the other option",
                         "most often first"}
    assert all(len(v) == 2 for v in path.values())
    assert all(0.0 <= p <= 1.0 for k, v in path.items() if k != "most often first" for p in v)
    text = (tmp_path / "out" / "coconut_prosqa_symbols.md").read_text()
    assert "| backbone | method |" in text and "--config configs/coconut-prosqa-symbols.yaml" in text
    assert "the solution path in the thoughts" in text
