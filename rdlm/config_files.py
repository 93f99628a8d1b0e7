"""Reading a configuration: a YAML file or a shipped config by name, plus dotted overrides
(``model.d_model=128``), into the frozen dataclasses of `rdlm.config` (`from_dict`, each value
converted to its field's type or refused by name), and back to plain data (`to_dict`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from rdlm.config import Config, ModelConfig, did_you_mean, model_preset
from rdlm.errors import ConfigError


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin in (tuple, Sequence) or annotation is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} is invalid: expected a list.")
        args = typing.get_args(annotation)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, where) for v in value)
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}={value!r} is invalid: expected a mapping.")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r} is invalid: expected true or false.")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer.")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept it as the number it means.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r} is invalid: expected a number.")
        if not math.isfinite(value):  # YAML reads .inf and .nan as floats
            raise ConfigError(f"{where}={value!r} is invalid: expected a finite number.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} is invalid: expected a string.")
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    return value


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {data!r}.")
    base = None
    if cls is ModelConfig and "preset" in data:
        base = model_preset(data.pop("preset"))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}{did_you_mean(key, fields)}; "
                              f"valid keys of {where or cls.__name__}: {sorted(fields)}.")
        values[key] = _coerce(value, hints[key], full)
    if base is not None:
        return dataclasses.replace(base, **values)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}



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
