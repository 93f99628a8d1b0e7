"""Llama-family checkpoints (Hugging Face safetensors) to and from rdlm's llama block: retrofit
recurrence into a pretrained fixed-depth model, and export a model that is still one.

Loading splits the checkpoint's L layers at K and K + M: layers [0, K) become the prelude,
[K, K + M) the recurrent core and the rest the coda; the adapter is [0; I], so the core reads
only the prelude's output and r = 1 (indeed every r, until training changes the adapter)
computes exactly the original network. Like the Huginn loader it streams one tensor at a time,
straight into its sharding when one is given, after checking every name, shape and dtype (and the
tokenizer beside the weights) from the file headers; all problems are reported together.

Saving goes the other way only while the model still is a fixed-depth network: when the adapter
is exactly [0; I] the core ignores the state, every r computes prelude + core + coda once, and
those layers written consecutively are that network. Once the adapter reads the state (any
training at r > 1), an unrolled r-step network needs each core step to mix two residual streams
(the state and the prelude's output), which a Llama decoder layer cannot express: the export is
refused and says so.
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
from rdlm.interop.llama_config import (CONFIG_FILE, LlamaFormatError, config_from_llama,
                                       llama_config, parse_config)
from rdlm.interop.llama_layout import (ADAPTER, DERIVED_SUFFIX, LM_HEAD, WTE, Entry,
                                       embedding_adapter, key_map, layer_order)
from rdlm.interop.safetensors_io import (ST_DTYPES, TORCH_DTYPE_NAMES, OutTensor, TensorInfo,
                                         parse_size, read_json, read_tensor, same_values,
                                         scan_files)
from rdlm.runtime.storage import StoragePath, as_given

__all__ = ["LlamaFormatError", "config_from_llama", "fixed_depth_problems", "llama_config",
           "load_llama", "read_llama_config", "save_llama", "tokenizer_problems"]

TOKENIZER_FILE = "tokenizer.json"


def _limited(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _source(name: str, tensors: Mapping[str, TensorInfo]) -> str:
    """Where a tensor is read from: a tied embedding may be stored only under the head's name."""
    return LM_HEAD if name == WTE and WTE not in tensors else name


def _check_tensors(entries: list[Entry], tensors: Mapping[str, TensorInfo], cfg: ModelConfig,
                   problems: list[str]) -> None:
    expected = {n: s for e in entries for n, s in zip(e.names, e.hf_shapes)}
    missing = [n for n in expected if _source(n, tensors) not in tensors]
    if missing:
        hints = []
        if LM_HEAD in missing:
            hints.append("config.json says tie_word_embeddings=false, so the head is its own "
                         f"tensor; set it true if {LM_HEAD} is meant to be the embedding")
        if any(n.endswith(".bias") for n in missing):
            hints.append("config.json says attention_bias=true; set it false if the "
                         "checkpoint has no biases")
        hints.append("otherwise the files are incomplete: fetch every shard, or correct "
                     "num_hidden_layers in config.json")
        problems.append(f"missing tensors: {_limited(missing)} ({'; '.join(hints)}).")
    ignored = (LM_HEAD,) if cfg.tie_embeddings else ()
    unexpected = [n for n in tensors if n not in expected and n not in ignored
                  and not n.endswith(DERIVED_SUFFIX)]
    if unexpected:
        problems.append(f"unexpected tensors (not part of the model config.json describes): "
                        f"{_limited(unexpected)}.")
    shape_of = dict(expected)
    shape_of[LM_HEAD] = (cfg.vocab_size, cfg.d_model)
    problems += tensor_problems(
        tensors, shape_of, " (hidden_size, intermediate_size, num_attention_heads, "
        "num_key_value_heads and vocab_size must describe the tensors)", " (dequantize first)")
    both = [tensors.get(WTE), tensors.get(LM_HEAD)]
    comparable = cfg.tie_embeddings and all(
        t is not None and t.shape == shape_of[LM_HEAD] and t.dtype in ST_DTYPES for t in both)
    if comparable and not same_values(tensors[WTE], WTE, tensors[LM_HEAD], LM_HEAD):
        problems.append(f"{LM_HEAD} differs from {WTE}, but config.json says "
                        "tie_word_embeddings=true: set it false to keep the separate head.")


def tokenizer_problems(directory: Path, vocab_size: int) -> list[str]:
    """Problems of the tokenizer.json beside a checkpoint: unreadable, or with ids the embedding
    has no row for."""
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        return []
    from rdlm.data.tokenizer import load_tokenizer  # deferred: data/ pulls in the tokenizers lib

    try:
        tok = load_tokenizer(file)
    except (ValueError, OSError) as err:
        return [f"{TOKENIZER_FILE} cannot be read: {err}"]
    if tok.vocab_size > vocab_size:
        return [f"{TOKENIZER_FILE} has {tok.vocab_size} tokens but the embedding has "
                f"{vocab_size} rows (vocab_size): ids past {vocab_size - 1} would have no "
                "embedding; this tokenizer does not belong to these weights."]
    return []


def _read_hf_config(directory: Path, problems: list[str]) -> dict[str, Any] | None:
    hf = read_json(directory / CONFIG_FILE, "config", problems)
    if hf is not None and not isinstance(hf, dict):
        problems.append("config.json must hold a JSON object.")
        return None
    return hf


def read_llama_config(path: str | os.PathLike, *, prelude: int, core: int,
                      dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a Llama-family checkpoint directory split as ``prelude``/``core``/
    the rest (reads only config.json)."""
    directory = Path(path)
    problems: list[str] = []
    hf = _read_hf_config(directory, problems)
    if problems or hf is None:
        raise LlamaFormatError(str(directory), problems)
    return config_from_llama(hf, prelude=prelude, core=core, dtype=dtype)


def _checked_dtype(dtype: Any, compute_dtype: str) -> np.dtype:
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r} is invalid: use one of {DTYPES}.")
    target = np.dtype(jax.numpy.dtype(dtype))
    if not np.issubdtype(target, np.floating) and target != np.dtype(jax.numpy.bfloat16):
        raise ValueError(f"dtype={dtype!r} is invalid: parameters need a floating-point dtype.")
    return target


def load_llama(path: str | os.PathLike, *, prelude: int, core: int, dtype: Any = "float32",
               compute_dtype: str = "float32", shardings: Any = None, mesh: Any = None
               ) -> tuple[ModelConfig, dict[str, Any]]:
    """Load a Llama-family checkpoint directory as ``(cfg, params)`` of a recurrent-depth model
    whose prelude is layers [0, prelude), core layers [prelude, prelude + core) and coda the rest.

    - ``path``: a directory with ``config.json`` and ``model.safetensors`` or shards listed by
      ``model.safetensors.index.json`` (``LlamaForCausalLM``, or ``MistralForCausalLM`` without
      a sliding window); a ``tokenizer.json`` there is checked against the embedding.
    - ``dtype``: dtype of the parameter arrays (float32 default; the file may hold float32,
      float16 or bfloat16); ``compute_dtype``: ``cfg.dtype`` of the returned config.
    - ``shardings`` / ``mesh``: as `rdlm.interop.load_huginn`; each tensor is placed straight into
      its sharding as it is read.

    The adapter is [0; I] (``cfg.adapter_init="embedding"``): at r = 1 the model computes the
    checkpoint's logits. Every problem with config.json, the split, the file set, tensor names,
    shapes and dtypes, and the tokenizer is reported at once in a `LlamaFormatError` before any
    tensor is read.
    """
    target = _checked_dtype(dtype, compute_dtype)
    directory = Path(path)
    if not directory.is_dir():
        raise LlamaFormatError(str(directory), ["is not a directory (expected a Hugging Face "
                                                "checkpoint directory with config.json)."])
    problems: list[str] = []
    hf = _read_hf_config(directory, problems)
    cfg = None
    if hf is not None:
        cfg, config_problems = parse_config(hf, prelude, core, compute_dtype)
        problems.extend(config_problems)
    tensors = scan_files(directory, problems)
    if cfg is not None:
        entries, treedef = key_map(cfg)
        _check_tensors(entries, tensors, cfg, problems)
        problems.extend(tokenizer_problems(directory, cfg.vocab_size))
    if problems or cfg is None:
        raise LlamaFormatError(str(directory), problems)

    placements = resolve_shardings(cfg, len(entries), treedef, shardings, mesh)
    leaves = []
    for entry, sharding in zip(entries, placements):
        if entry.path == ADAPTER:
            array = embedding_adapter(cfg.d_model, target)
        else:
            parts = [read_tensor(tensors[_source(n, tensors)], _source(n, tensors)).astype(
                target, copy=False) for n in entry.names]
            array = np.ascontiguousarray(entry.to_rdlm(parts))
            del parts
        leaves.append(place(array, sharding))
        del array
    return cfg, jax.tree.unflatten(treedef, leaves)


def fixed_depth_problems(cfg: ModelConfig, adapter: Any | None) -> list[str]:
    """Why ``cfg`` with this core adapter is not one fixed-depth Llama network (empty if it is:
    the llama block, no token shift, and the adapter exactly [0; I]; None skips the adapter)."""
    problems = []
    if cfg.block != "llama":
        problems.append(f"model.block={cfg.block!r}: only the llama block is a Llama decoder "
                        "layer (export a Huginn-block model with `rdlm convert rdlm-to-huginn`).")
    if cfg.token_shift:
        problems.append("model.token_shift is an rdlm extension that a Llama checkpoint cannot "
                        "hold; only models with token_shift=0 can be exported.")
    if adapter is None:
        return problems
    a = np.asarray(adapter, np.float32)
    d = cfg.d_model
    if a.shape != (2 * d, d):
        problems.append(f"the core adapter has shape {list(a.shape)}, expected {[2 * d, d]}.")
        return problems
    state_half, embedding_half = a[:d], a[d:]
    reads_state = float(np.abs(state_half).max())
    off_identity = float(np.abs(embedding_half - np.eye(d, dtype=np.float32)).max())
    if reads_state or off_identity:
        problems.append(
            f"the core adapter is no longer [0; I] (max |state half| = {reads_state:.3g}, max "
            f"|embedding half - I| = {off_identity:.3g}): the core mixes the recurrent state "
            "with the prelude's output, so the model at any r is not a stack of Llama decoder "
            "layers (each unrolled step would have to read two residual streams). Only a "
            "converted model whose adapter was kept at [0; I] (untrained, or trained with the "
            "adapter frozen) has a fixed-depth export; keep this one in rdlm's format.")
    return problems


def _out_tensors(entries: list[Entry], leaves: list[Any], out_dtype: np.dtype) -> list[OutTensor]:
    """The tensors of the fixed-depth checkpoint in layer order; each is fetched from the devices
    only when written (a stacked leaf once per tensor it holds)."""
    def fetch(entry: Entry, leaf: Any, i: int) -> Callable[[], np.ndarray]:
        return lambda: entry.to_hf(to_host(leaf))[i].astype(out_dtype)

    tensors = [OutTensor(name, shape, out_dtype, fetch(e, leaf, i))
               for e, leaf in zip(entries, leaves)
               for i, (name, shape) in enumerate(zip(e.names, e.hf_shapes))]
    return sorted(tensors, key=lambda t: layer_order(t.name))


def _check_params(entries: list[Entry], treedef: Any, params: Any) -> list[Any]:
    try:
        leaves = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as err:
        raise LlamaFormatError("params", [f"do not have the structure of "
                                          f"rdlm.abstract_params(cfg): {err}"]) from None
    problems = [f"{'/'.join(map(str, e.path))} has shape {list(getattr(leaf, 'shape', ()))}, "
                f"config implies {list(e.shape)}."
                for e, leaf in zip(entries, leaves) if tuple(getattr(leaf, "shape", ())) != e.shape]
    if problems:
        raise LlamaFormatError("params", problems)
    return leaves


def save_llama(cfg: ModelConfig, params: Any, path: str | os.PathLike, *,
               max_shard_size: int | str = "5GB", dtype: str = "float32",
               overwrite: bool = False, token_ids: Mapping[str, Any] | None = None,
               extra_files: Mapping[str, str | os.PathLike] | None = None,
               extra_texts: Mapping[str, str] | None = None) -> StoragePath:
    """Write a llama-block model whose adapter is still [0; I] as the fixed-depth
    ``LlamaForCausalLM`` it computes (prelude, core and coda as consecutive layers), loadable with
    ``transformers.AutoModelForCausalLM.from_pretrained(path)``.

    Refused, before anything is written, with a `LlamaFormatError` that says why, when the model
    is not such a network (`fixed_depth_problems`). ``dtype``: the written tensors (float32 is
    exact); ``max_shard_size``: as `rdlm.interop.save_huginn`; ``token_ids``: bos/eos/pad ids for
    config.json; ``extra_files`` ``{name: source}`` copied and ``extra_texts`` ``{name: text}``
    written beside the weights (tokenizer files, generation_config.json, a model card). The
    directory is assembled under a temporary name and renamed into place (or uploaded to a bucket
    URL, config.json last); in a multi-process run every process calls this and process 0 writes.
    """
    if dtype not in TORCH_DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is invalid: use one of {sorted(TORCH_DTYPE_NAMES)}.")
    cfg = getattr(cfg, "model", cfg)
    max_bytes = parse_size(max_shard_size)
    final = as_given(path)  # a folder or a bucket
    if final.exists() and not overwrite:
        raise FileExistsError(f"{str(final)!r} exists; pass overwrite=True to replace it.")
    if cfg.block != "llama":
        raise LlamaFormatError("model", fixed_depth_problems(cfg, None))
    entries, treedef = key_map(cfg)
    leaves = _check_params(entries, treedef, params)
    adapter = next(to_host(leaf) for e, leaf in zip(entries, leaves) if e.path == ADAPTER)
    problems = fixed_depth_problems(cfg, adapter)
    if problems:
        raise LlamaFormatError("model", problems)
    tensors = _out_tensors([e for e in entries if e.names],
                           [leaf for e, leaf in zip(entries, leaves) if e.names],
                           ST_DTYPES[TORCH_DTYPE_NAMES[dtype]])
    return write_hf_dir(final, tensors, max_bytes, lambda: llama_config(cfg, torch_dtype=dtype, token_ids=token_ids),
                        existing_files(extra_files), extra_texts, overwrite, CONFIG_FILE)
