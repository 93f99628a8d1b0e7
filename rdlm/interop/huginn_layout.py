"""The key map between rdlm params leaves and Huginn-0125's Hugging Face tensors: names, shapes and
the transpose/reshape between PyTorch ``[out, in]`` and rdlm's ``[in, out]`` layout."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from rdlm.config import ModelConfig
from rdlm.model import abstract_params

# Derived data (RoPE table) that the PyTorch model keeps as a persistent buffer.
FREQS_CIS = "freqs_cis"
LM_HEAD = "lm_head.weight"
WTE = "transformer.wte.weight"

class Entry(NamedTuple):
    """One params leaf and its Hugging Face tensor."""

    path: tuple[Any, ...]  # keys into the params pytree, e.g. ("core", "blocks", 0, "attn", "wqkv")
    name: str  # Hugging Face key, e.g. "transformer.core_block.0.attn.Wqkv.weight"
    shape: tuple[int, ...]  # rdlm shape
    hf_shape: tuple[int, ...]  # Hugging Face (PyTorch) shape
    matrix: bool  # True: hf = rdlm.reshape(in, out).T ; False: same array

    def to_rdlm(self, hf_array: np.ndarray) -> np.ndarray:
        return hf_array.T.reshape(self.shape) if self.matrix else hf_array.reshape(self.shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.matrix:
            return array.reshape(self.shape[0], -1).T
        return array.reshape(self.hf_shape)


_BLOCK_KEYS = {("norm_1", "weight"): ("norm_1.weight", False),
               ("norm_2", "weight"): ("norm_2.weight", False),
               ("norm_3", "weight"): ("norm_3.weight", False),
               ("norm_4", "weight"): ("norm_4.weight", False),
               ("attn", "wqkv"): ("attn.Wqkv.weight", True),
               ("attn", "qk_bias"): ("attn.qk_bias", False),
               ("attn", "proj"): ("attn.proj.weight", True),
               ("mlp", "fc"): ("mlp.fc.weight", True),
               ("mlp", "proj"): ("mlp.proj.weight", True)}


def _hf_name(path: tuple[Any, ...]) -> tuple[str, bool]:
    if path == ("wte",):
        return WTE, False
    if path == ("ln_f", "weight"):
        return "transformer.ln_f.weight", False
    if path == ("core", "adapter"):
        return "transformer.adapter.weight", True
    if path[:2] == ("core", "blocks"):
        stack, index, rest = "core_block", path[2], path[3:]
    elif path[0] in ("prelude", "coda"):
        stack, index, rest = path[0], path[1], path[2:]
    else:
        stack, index, rest = None, None, None
    if stack is None or rest not in _BLOCK_KEYS:
        raise RuntimeError(f"rdlm params leaf {path} has no Huginn counterpart; the key map in "
                           "rdlm/interop/huginn_layout.py must follow rdlm/model/model.py.")
    suffix, matrix = _BLOCK_KEYS[rest]
    return f"transformer.{stack}.{index}.{suffix}", matrix


def _path_keys(path: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def key_map(cfg: ModelConfig) -> tuple[list[Entry], Any]:
    """Every params leaf of ``cfg`` with its Hugging Face key and shapes, and the params treedef."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
    entries = []
    for path, leaf in leaves:
        keys = _path_keys(path)
        name, matrix = _hf_name(keys)
        shape = tuple(leaf.shape)
        hf_shape = (math.prod(shape[1:]), shape[0]) if matrix else shape
        entries.append(Entry(keys, name, shape, hf_shape, matrix))
    return entries, treedef


def freqs_cis(cfg: ModelConfig) -> np.ndarray:
    """The RoPE table the PyTorch model stores as buffer ``freqs_cis``: [1, T, 1, head_dim/2, 2]."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (np.float32(cfg.rope_base) ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    angles = np.outer(np.arange(cfg.max_seq_len, dtype=np.float32), inv_freq).astype(np.float32)
    table = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    return table[None, :, None].astype(np.float32)
