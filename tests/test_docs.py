"""The README's Python examples run as written, in order, in one namespace (as a user pastes
them into a notebook), and the numbers their comments state hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rdlm.config import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # shipped configs resolve by name from any directory
    blocks = python_blocks(README)
    assert len(blocks) >= 4, "the README's Python examples moved: update this test"
    namespace: dict = {"__name__": "__main__"}
    for i, block in enumerate(blocks):
        bad_key = "d_modle" in block  # the example of a config error, shown on purpose
        if bad_key:
            with pytest.raises(ConfigError, match=r"unknown config key 'model.d_modle' "
                                                  r"\(did you mean 'd_model'\?\)"):
                exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        else:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    rdlm = namespace["rdlm"]
    count = re.search(r'count_params\(rdlm.model_preset\("huginn-3.5b"\)\)\s+# ([\d_]+)',
                      README.read_text())
    assert count, "the README no longer states Huginn-0125's parameter count"
    assert rdlm.count_params(rdlm.model_preset("huginn-3.5b")) == int(count.group(1))
    assert namespace["aux"]["trajectory"].shape[0] == 8
    assert namespace["grads"].keys() == namespace["params"].keys()
