"""What every Hugging Face checkpoint directory needs, whatever its layout: placing each tensor
read into its sharding, gathering each tensor to write back to host memory, writing the
safetensors shards (and their index), and committing a directory atomically, on disk or in a
bucket. The layouts (`huginn`, `llama`) say which tensors go where; this module moves them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from rdlm.config import ModelConfig
from rdlm.errors import ConfigError
from rdlm.interop.safetensors_io import (INDEX_FILE, SINGLE_FILE, ST_DTYPES, OutTensor, plan_shards,
                                         write_safetensors)
from rdlm.runtime import sharding as rdlm_sharding
from rdlm.runtime.storage import StoragePath, as_path, copy_file, upload_tree


class FormatError(ConfigError):
    """A checkpoint or config does not match what a layout can hold; the message lists every
    problem (``problems``), found before anything was read or written."""

    def __init__(self, where: str, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where}: {len(self.problems)} problem(s):\n{lines}")


def is_int(value: Any) -> bool:
    """An int in a config.json, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def tensor_problems(tensors: Mapping[str, Any], shape_of: Mapping[str, tuple[int, ...]],
                    shape_hint: str = "", dtype_hint: str = "") -> list[str]:
    """Each named tensor (a `TensorInfo`: shape, dtype, file) whose shape is not what the config
    implies, or whose dtype cannot be converted; ``*_hint`` end those messages."""
    problems = []
    for name, info in tensors.items():
        if name in shape_of and info.shape != shape_of[name]:
            problems.append(f"{name} has shape {list(info.shape)} in {info.file.name}, but "
                            f"config.json implies {list(shape_of[name])}{shape_hint}.")
        if name in shape_of and info.dtype not in ST_DTYPES:
            problems.append(f"{name} has dtype {info.dtype}; only {sorted(ST_DTYPES)} "
                            f"floating-point tensors can be converted{dtype_hint}.")
    return problems


def place(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """``array`` on the devices: the default device, or straight into ``sharding``."""
    if sharding is None:
        return jax.device_put(array)
    # Works for shardings that span several hosts: each process supplies only its own shards.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def resolve_shardings(cfg: ModelConfig, count: int, treedef: Any, shardings: Any,
                      mesh: Any) -> list[Any]:
    """One sharding (or None) per params leaf, from ``shardings`` (a pytree mirroring the params,
    or one sharding for all) or ``mesh`` (`rdlm.runtime.sharding.param_shardings`)."""
    if shardings is not None and mesh is not None:
        raise ValueError("give shardings= or mesh=, not both.")
    if mesh is not None:
        shardings = rdlm_sharding.param_shardings(cfg, mesh)
    if shardings is None:
        return [None] * count
    if isinstance(shardings, jax.sharding.Sharding):
        return [shardings] * count
    leaves, tree = jax.tree.flatten(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if tree != treedef:
        raise ValueError("shardings must mirror the params pytree of the checkpoint's config "
                         f"(rdlm.abstract_params(cfg)); got structure {tree}.")
    return leaves


def to_host(leaf: Any) -> np.ndarray:
    """A params leaf as one host array, gathered from every process when it spans several."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def assembly_dir(final: StoragePath) -> Path:
    """Where the directory ``final`` is put together: beside it on disk, so that committing it is
    a rename; for a bucket in a local temporary folder, committed by an upload."""
    name = f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    return final.with_name(name) if isinstance(final, Path) else Path(tempfile.gettempdir()) / name


def commit_dir(tmp: Path, final: StoragePath, overwrite: bool, last: str) -> None:
    """Put the finished ``tmp`` at ``final`` (replacing it only with ``overwrite``): a rename on
    disk; in a bucket an upload with the file ``last`` (config.json) after all the others, so a
    reader that finds it finds every file."""
    if final.exists() and not overwrite:
        raise FileExistsError(f"{str(final)!r} exists; pass overwrite=True to replace it.")
    if not isinstance(final, Path):
        if final.exists():  # the old config.json goes first: the old files never look whole
            (final / last).unlink(missing_ok=True)
            final.rmtree()
        upload_tree(tmp, final, last=(last,))
        return
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def existing_files(extra_files: Mapping[str, str | os.PathLike] | None
                   ) -> dict[str, StoragePath]:
    """``{name: source}`` as paths, every source checked to exist before anything is written."""
    extra = {name: as_path(source) for name, source in (extra_files or {}).items()}
    absent = [str(source) for source in extra.values() if not source.is_file()]
    if absent:
        raise FileNotFoundError(f"extra files do not exist: {absent}.")
    return extra


def write_shards(directory: Path | None, tensors: list[OutTensor], max_bytes: int) -> None:
    """The safetensors files (and the index, when sharded) into ``directory``; a process that does
    not write (``directory`` None) still gathers every tensor, in the writer's order."""
    shards = plan_shards(tensors, max_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for shard, name in zip(shards, names):
        if directory is not None:
            write_safetensors(directory / name, shard)
        else:
            for t in shard:
                t.fetch()
    if directory is not None and len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: n for s, n in zip(shards, names) for t in s}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_hf_dir(final: StoragePath, tensors: list[OutTensor], max_bytes: int,
                 config: Callable[[], dict[str, Any]],
                 extra_files: Mapping[str, StoragePath], extra_texts: Mapping[str, str] | None,
                 overwrite: bool, config_file: str = "config.json") -> StoragePath:
    """A Hugging Face directory at ``final``: the tensors' shards, ``config()`` as config.json,
    ``extra_files`` copied and ``extra_texts`` written beside them.

    Assembled under a temporary name beside ``final`` and renamed into place (in a bucket:
    assembled locally and uploaded, config.json last), so an interrupted save leaves no partial
    checkpoint. In a multi-process run every process calls this (the tensors are gathered
    collectively) and process 0 writes.
    """
    writer = jax.process_index() == 0
    tmp = assembly_dir(final)
    try:
        if writer:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        write_shards(tmp if writer else None, tensors, max_bytes)
        if writer:
            (tmp / config_file).write_text(json.dumps(config(), indent=2) + "\n")
            for name, source in extra_files.items():
                copy_file(source, tmp / name)  # a run's files may be in a bucket
            for name, text in (extra_texts or {}).items():
                (tmp / name).write_text(text)
            commit_dir(tmp, final, overwrite, config_file)
    finally:
        if writer and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"write_hf_dir:{final}")
    return final
