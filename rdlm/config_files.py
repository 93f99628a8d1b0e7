"""Reading a configuration: a YAML file or a shipped config by name, plus dotted overrides
(``model.d_model=128``), into the frozen dataclasses of `rdlm.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from rdlm.config import Config, from_dict
from rdlm.errors import ConfigError


def _override_value(raw: str) -> Any:
    """A ``key=value`` override's value as YAML reads it (numbers, true, [a, b]), or the text
    itself where YAML cannot read it (a path with braces such as data/{split}-*.npy)."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


# The configs that ship inside the package (the repository's configs/ links here), so that
# `rdlm train tiny` and `rdlm demo` work after `pip install`, outside a checkout.
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "configs"


def bundled_configs() -> list[str]:
    """Names of the shipped configs (``tiny``, ``demo``, …)."""
    return sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.yaml"))


def config_path(path: str | Path) -> Path:
    """The YAML file ``path`` names: the file itself; else a shipped config, by name (``tiny``)
    or as ``configs/<name>.yaml`` from any directory. `ConfigError` when neither exists."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = BUNDLED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml")
                                 else f"{path.name}.yaml")
    if (len(path.parts) == 1 or path.parent.name == "configs") and shipped.is_file():
        return shipped
    raise ConfigError(f"config file {str(path)!r} does not exist; give a YAML file or a shipped "
                      f"config by name: {bundled_configs()}.")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                cls: type = Config) -> Any:
    """Read a YAML config and apply dotted overrides such as ``"model.d_model=128"``.

    Override values are parsed as YAML scalars (``true``, ``3e-4``, ``[1, 2]``). An unknown key,
    in the file or in an override, raises `ConfigError` naming the key and the closest valid one.
    """
    return from_dict(cls, config_data(path, overrides))


def config_data(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The plain nested dict of a YAML config (a file or a shipped name) with the dotted
    overrides applied, before any checking: what `load_config` and the Coconut loader build
    their dataclasses from."""
    data: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level.")
        data = loaded or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value "
                              "(e.g. model.d_model=128).")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is a value, not a section.")
            node = child
        node[keys[-1]] = _override_value(raw)
    return data
