"""`make demo` end to end at a minuscule setting: trains the embedded default's config, evaluates
accuracy per r, writes the table and plot, shows solved problems with iterations under KL exit,
and reuses the finished run when started again."""

from __future__ import annotations

import json

from rdlm.cli import demo

SMALL = ["model.d_model=32", "model.mlp_dim=64", "model.n_heads=2", "train.steps=2",
         "train.batch_size=4", "train.warmup_steps=1", "train.progress=lines"]


def test_demo_trains_evaluates_and_reuses(tmp_path, capsys):
    overrides = [*SMALL, f"train.run_dir={tmp_path / 'demo'}"]
    summary = demo.run(demo.DEFAULT_CONFIG, overrides, num_steps_list=(1, 2), num_examples=8,
                       show=2)
    assert set(summary["accuracy"]) == {1, 2}
    assert summary["model_config"]["token_shift"] == 2  # the embedded default's model
    for name in ("results.md", "results.json", "accuracy_vs_r.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert len(saved["examples"]) == 2
    # Iterations per generated token under KL exit: the answer digit may stop early, never past
    # the cap of 32 steps.
    assert all(1 <= s <= 32 for ex in saved["examples"] for _, s in ex["steps_per_token"])
    out = capsys.readouterr().out
    assert "iterations per token under KL exit" in out
    demo.run(demo.DEFAULT_CONFIG, overrides, num_steps_list=(1,), num_examples=4, show=0)
    assert "reusing the finished checkpoint" in capsys.readouterr().out
