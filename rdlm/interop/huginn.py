"""Huginn-0125 checkpoints (Hugging Face safetensors, PyTorch layout) to and from rdlm params.

The published format (SPEC "Checkpoint layout of Huginn-0125") is a directory with
``config.json`` and either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Matrices are PyTorch ``[out, in]``; rdlm keeps ``[in, out]`` with
the fused q|k|v and gate|up outputs as explicit axes, so every matrix is transposed and reshaped,
nothing is split or merged.

Both directions work one tensor at a time: loading reads, converts and places a tensor (directly
into its sharding when one is given) before touching the next one, and saving streams each tensor
from the devices into the file, so neither ever holds a second copy of the model in host memory.
Problems are collected and reported together, before anything is read or written.

The pieces: `huginn_config` (config.json <-> `ModelConfig`), `huginn_layout` (the key map between
params leaves and tensors), `safetensors_io` (the files); this module loads and saves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from rdlm.config import DTYPES, ModelConfig
from rdlm.interop.hf_io import (existing_files, place, resolve_shardings, tensor_problems,
                                to_host, write_hf_dir)
from rdlm.interop.huginn_config import (ARCHITECTURE, CODE_FILES, CODE_REPO, CONFIG_FILE,
                                        MODEL_TYPE, HuginnFormatError, config_from_huginn,
                                        huginn_config, parse_config)
from rdlm.interop.huginn_layout import FREQS_CIS, LM_HEAD, WTE, Entry, freqs_cis, key_map
from rdlm.interop.safetensors_io import (ST_DTYPES, TORCH_DTYPE_NAMES, OutTensor, TensorInfo,
                                         parse_size, read_json, read_tensor, same_values,
                                         scan_files)
from rdlm.runtime.storage import StoragePath, as_given

__all__ = ["ARCHITECTURE", "CODE_FILES", "CODE_REPO", "MODEL_TYPE", "HuginnFormatError",
           "config_from_huginn", "huginn_config", "key_map", "load_huginn", "read_config",
           "save_huginn"]


def _limited(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _check_tensors(entries: list[Entry], tensors: Mapping[str, TensorInfo], cfg: ModelConfig,
                   problems: list[str]) -> None:
    expected = {e.name: e.hf_shape for e in entries}
    missing = [n for n in expected if n not in tensors and _source(n, tensors) not in tensors]
    if missing:
        problems.append(f"missing tensors: {_limited(missing)}.")
    unexpected = [n for n in tensors if n not in expected and n not in (LM_HEAD, FREQS_CIS)]
    if unexpected:
        problems.append(f"unexpected tensors (not part of this config's model): "
                        f"{_limited(unexpected)}.")
    shape_of = dict(expected)
    shape_of[LM_HEAD] = (cfg.vocab_size, cfg.d_model)
    problems += tensor_problems(tensors, shape_of)
    both = [tensors.get(WTE), tensors.get(LM_HEAD)]
    comparable = all(t is not None and t.shape == shape_of[LM_HEAD] and t.dtype in ST_DTYPES
                     for t in both)
    if comparable and not same_values(tensors[WTE], WTE, tensors[LM_HEAD], LM_HEAD):
        problems.append(f"{LM_HEAD} differs from {WTE}: untied output embeddings are not "
                        "supported (rdlm ties the head to the embedding, as Huginn-0125 does).")


def _source(name: str, tensors: Mapping[str, TensorInfo]) -> str:
    """Where a tensor is read from: the embedding may be stored only under the tied head's name."""
    return LM_HEAD if name == WTE and WTE not in tensors else name


def read_config(path: str | os.PathLike, *, dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a Huginn checkpoint directory (reads only config.json)."""
    directory = Path(path)
    problems: list[str] = []
    hf = read_json(directory / CONFIG_FILE, "config", problems)
    if problems:
        raise HuginnFormatError(str(directory), problems)
    if not isinstance(hf, dict):
        raise HuginnFormatError(str(directory), ["config.json must hold a JSON object."])
    return config_from_huginn(hf, dtype=dtype)


def load_huginn(path: str | os.PathLike, *, dtype: Any = "float32", compute_dtype: str = "float32",
                shardings: Any = None, mesh: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Load a Huginn-0125-format checkpoint directory as ``(cfg, params)``.

    - ``path``: a directory with ``config.json`` and ``model.safetensors`` or sharded files listed
      by ``model.safetensors.index.json`` (the Hugging Face layout).
    - ``dtype``: dtype of the parameter arrays (default float32, rdlm's convention; ``"bfloat16"``
      halves the memory). The file may hold float32, float16 or bfloat16 tensors.
    - ``compute_dtype``: ``cfg.dtype`` of the returned config (activations); ``"bfloat16"`` is how
      the released model was evaluated, ``"float32"`` reproduces the reference logits exactly.
    - ``shardings``: a pytree of `jax.sharding.Sharding` mirroring the params (or one sharding for
      every leaf); ``mesh``: a `jax.sharding.Mesh`, sharded by `rdlm.runtime.sharding.param_shardings`.
      Each tensor is placed straight into its sharding as it is read.

    Every problem with config.json, the file set, tensor names, shapes and dtypes is reported at
    once in a `HuginnFormatError`, found from the file headers before any parameter is read.
    ``lm_head.weight`` may be absent (tied) or present, in which case it must equal the embedding.
    ``freqs_cis`` is ignored.
    """
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r} is invalid: use one of {DTYPES}.")
    target = np.dtype(jax.numpy.dtype(dtype))
    if not np.issubdtype(target, np.floating) and target != np.dtype(jax.numpy.bfloat16):
        raise ValueError(f"dtype={dtype!r} is invalid: parameters need a floating-point dtype.")
    directory = Path(path)
    if not directory.is_dir():
        raise HuginnFormatError(str(directory), ["is not a directory (expected a Hugging Face "
                                                 "checkpoint directory with config.json)."])
    problems: list[str] = []
    hf = read_json(directory / CONFIG_FILE, "config", problems)
    cfg = None
    if isinstance(hf, dict):
        cfg, config_problems = parse_config(hf, compute_dtype)
        problems.extend(config_problems)
    elif hf is not None:
        problems.append("config.json must hold a JSON object.")
    tensors = scan_files(directory, problems)
    if cfg is not None:
        entries, treedef = key_map(cfg)
        _check_tensors(entries, tensors, cfg, problems)
    if problems:
        raise HuginnFormatError(str(directory), problems)

    placements = resolve_shardings(cfg, len(entries), treedef, shardings, mesh)
    leaves = []
    for entry, sharding in zip(entries, placements):
        name = _source(entry.name, tensors)
        hf_array = read_tensor(tensors[name], name)
        array = np.ascontiguousarray(entry.to_rdlm(hf_array.astype(target, copy=False)))
        del hf_array
        leaves.append(place(array, sharding))
        del array
    return cfg, jax.tree.unflatten(treedef, leaves)


def _check_params(cfg: ModelConfig, entries: list[Entry], treedef: Any, params: Any) -> list[Any]:
    problems = []
    try:
        leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise HuginnFormatError("params", [f"do not have the structure of "
                                           f"rdlm.abstract_params(cfg): {err}"]) from None
    for entry, leaf in zip(entries, leaves):
        shape = tuple(getattr(leaf, "shape", ()))
        if shape != entry.shape:
            problems.append(f"{'/'.join(map(str, entry.path))} has shape {list(shape)}, "
                            f"config implies {list(entry.shape)}.")
    if problems:
        raise HuginnFormatError("params", problems)
    return leaves


def _out_tensors(cfg: ModelConfig, entries: list[Entry], leaves: list[Any], out_dtype: np.dtype,
                 include_lm_head: bool, include_freqs_cis: bool) -> list[OutTensor]:
    """What the directory holds, in the PyTorch model's module order (wte, prelude, adapter, core,
    coda, ln_f: for readability); each tensor is fetched from the devices only when written."""
    def fetch(entry: Entry, leaf: Any) -> Callable[[], np.ndarray]:
        return lambda: entry.to_hf(to_host(leaf)).astype(out_dtype)

    tensors = [OutTensor(e.name, e.hf_shape, out_dtype, fetch(e, leaf))
               for e, leaf in zip(entries, leaves)]
    order = {"wte": 0, "prelude": 1, "adapter": 2, "core_block": 3, "coda": 4, "ln_f": 5}
    tensors.sort(key=lambda t: (order[t.name.split(".")[1]],
                                int(t.name.split(".")[2]) if t.name.split(".")[2].isdigit() else 0))
    if include_lm_head:
        wte = next(t for t in tensors if t.name == WTE)
        tensors.append(OutTensor(LM_HEAD, wte.shape, out_dtype, wte.fetch))
    if include_freqs_cis:
        table = freqs_cis(cfg)
        tensors.append(OutTensor(FREQS_CIS, table.shape, table.dtype, lambda: table))
    return tensors


def save_huginn(cfg: ModelConfig, params: Any, path: str | os.PathLike, *,
                max_shard_size: int | str = "5GB", dtype: str = "float32",
                code_repo: str | None = None, include_lm_head: bool = False,
                include_freqs_cis: bool = True, overwrite: bool = False,
                extra_files: Mapping[str, str | os.PathLike] | None = None,
                extra_texts: Mapping[str, str] | None = None) -> StoragePath:
    """Write ``params`` as a Huginn-0125-format checkpoint directory that the original PyTorch
    code (``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``) loads.

    - ``max_shard_size``: above it the weights are split into ``model-0000k-of-0000n.safetensors``
      with a ``model.safetensors.index.json``; below it one ``model.safetensors``.
    - ``dtype``: ``"float32"`` (exact), ``"bfloat16"`` (as released) or ``"float16"``.
    - ``code_repo``: see `huginn_config`; ``include_lm_head`` writes the tied head as a second copy;
      ``include_freqs_cis`` writes the RoPE buffer the PyTorch model expects in its state dict.
    - ``extra_files``: ``{name: source}`` copied into the directory too (``tokenizer.json``, or
      the two ``raven_*_minimal.py`` files of the release, which make the directory loadable
      offline with ``trust_remote_code=True``); ``extra_texts``: ``{name: text}`` written there
      (``tokenizer_config.json``, ``generation_config.json``, a model card).

    The directory is assembled under a temporary name beside ``path`` and renamed into place, so an
    interrupted save leaves no partial checkpoint (a bucket URL: assembled locally and uploaded,
    config.json last). In a multi-process run every process must call this (parameters are
    gathered collectively); process 0 writes.
    """
    if dtype not in TORCH_DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is invalid: use one of {sorted(TORCH_DTYPE_NAMES)}.")
    model_cfg = getattr(cfg, "model", cfg)
    if model_cfg.token_shift:
        raise ValueError("model.token_shift is an rdlm extension that the Huginn-0125 format "
                         "cannot hold; only models trained with token_shift=0 can be exported.")
    if model_cfg.block != "huginn" or not model_cfg.tie_embeddings:
        raise ValueError(f"the Huginn-0125 format holds Huginn's block with a tied head, not "
                         f"model.block={model_cfg.block!r}, "
                         f"tie_embeddings={model_cfg.tie_embeddings}; export a llama-block "
                         "model with `rdlm convert rdlm-to-llama` instead.")
    max_bytes = parse_size(max_shard_size)
    final = as_given(path)  # a folder or a bucket
    if final.exists() and not overwrite:
        raise FileExistsError(f"{str(final)!r} exists; pass overwrite=True to replace it.")
    entries, treedef = key_map(cfg)
    leaves = _check_params(cfg, entries, treedef, params)
    tensors = _out_tensors(cfg, entries, leaves, ST_DTYPES[TORCH_DTYPE_NAMES[dtype]],
                           include_lm_head, include_freqs_cis)
    return write_hf_dir(final, tensors, max_bytes, lambda: huginn_config(cfg, torch_dtype=dtype, code_repo=code_repo),
                        existing_files(extra_files), extra_texts, overwrite, CONFIG_FILE)
