"""What `pip install rdlm` gives a user outside the repository: the shipped configs by name, the
pinned dependencies, and a CLI that names itself."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import rdlm
from rdlm.cli import main
from rdlm.config import ConfigError
from rdlm.config_files import bundled_configs

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert {"tiny", "demo", "text-small", "huginn-3.5b"} <= set(bundled_configs())
    assert rdlm.load_config("tiny") == rdlm.load_config(ROOT / "configs" / "tiny.yaml")
    assert rdlm.load_config("configs/demo.yaml").train.steps == \
        rdlm.load_config(ROOT / "configs" / "demo.yaml").train.steps
    with pytest.raises(ConfigError, match=r"shipped config by name: \[.*'tiny'"):
        rdlm.load_config("tinny")


def test_the_wheel_carries_configs_and_pins_every_runtime_dependency(tmp_path, capsys):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = zipfile.ZipFile(next(tmp_path.glob("rdlm-*.whl")))
    names = set(wheel.namelist())
    assert {f"rdlm/configs/{n}.yaml" for n in ("tiny", "demo", "text-small")} <= names
    metadata = wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    required = dict(re.findall(r"^Requires-Dist: ([\w.-]+)==([\w.]+)$", metadata, re.M))
    pinned = dict(re.findall(r"^([\w.-]+)==([\w.]+)", (ROOT / "requirements.txt").read_text(),
                             re.M))
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "grain", "chex", "tokenizers",
                 "safetensors", "tensorboardX", "matplotlib", "pyarrow", "PyYAML", "tqdm"):
        assert required[name] == pinned[name], name
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: rdlm <command>")
