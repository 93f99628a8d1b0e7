"""The key map between the params of a llama-block model and a Llama-family checkpoint's tensors:
names, shapes, and the transpose/reshape/stack between PyTorch ``[out, in]`` and rdlm's
``[in, out]`` layout.

Layer ``i`` of the checkpoint is ``prelude/i`` for i < K, ``core/blocks/(i - K)`` for
K <= i < K + M and ``coda/(i - K - M)`` after that. rdlm fuses k|v and gate|up as an explicit
axis, so those leaves are stacked from two tensors; everything else is one tensor transposed or
reshaped. The core's adapter has no counterpart: it is [0; I] at conversion.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

from rdlm.config import ModelConfig
from rdlm.model import abstract_params

WTE = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
ADAPTER = ("core", "adapter")
# Tensors some checkpoints carry that the computation derives (older Llama files keep the RoPE
# frequencies as a buffer): ignored when loading.
DERIVED_SUFFIX = ".rotary_emb.inv_freq"


class Entry(NamedTuple):
    """One params leaf and the Hugging Face tensor(s) it is made of."""

    path: tuple[Any, ...]  # keys into the params pytree, e.g. ("core", "blocks", 0, "attn", "wkv")
    names: tuple[str, ...]  # Hugging Face keys; several are stacked along `axis`
    shape: tuple[int, ...]  # rdlm shape
    hf_shapes: tuple[tuple[int, ...], ...]  # Hugging Face (PyTorch) shape of each name
    matrix: bool  # True: each tensor is a PyTorch Linear weight, hf = part.reshape(in, out).T
    axis: int | None  # the rdlm axis the tensors are stacked along (None: one tensor)

    def _part_shape(self) -> tuple[int, ...]:
        if self.axis is None:
            return self.shape
        return self.shape[:self.axis] + self.shape[self.axis + 1:]

    def to_rdlm(self, hf_arrays: Sequence[np.ndarray]) -> np.ndarray:
        part = self._part_shape()
        parts = [a.T.reshape(part) if self.matrix else a.reshape(part) for a in hf_arrays]
        return parts[0] if self.axis is None else np.stack(parts, axis=self.axis)

    def to_hf(self, array: np.ndarray) -> list[np.ndarray]:
        parts = [array] if self.axis is None else [
            np.take(array, i, axis=self.axis) for i in range(len(self.names))]
        return [p.reshape(p.shape[0], -1).T if self.matrix else p.reshape(s)
                for p, s in zip(parts, self.hf_shapes)]


# rdlm block leaf -> (Hugging Face suffixes of the decoder layer, matrix, stacking axis)
_BLOCK_KEYS: dict[tuple[str, ...], tuple[tuple[str, ...], bool, int | None]] = {
    ("norm_1", "weight"): (("input_layernorm.weight",), False, None),
    ("norm_2", "weight"): (("post_attention_layernorm.weight",), False, None),
    ("attn", "wq"): (("self_attn.q_proj.weight",), True, None),
    ("attn", "wkv"): (("self_attn.k_proj.weight", "self_attn.v_proj.weight"), True, 1),
    ("attn", "proj"): (("self_attn.o_proj.weight",), True, None),
    ("attn", "q_bias"): (("self_attn.q_proj.bias",), False, None),
    ("attn", "kv_bias"): (("self_attn.k_proj.bias", "self_attn.v_proj.bias"), False, 0),
    ("attn", "proj_bias"): (("self_attn.o_proj.bias",), False, None),
    ("mlp", "fc"): (("mlp.gate_proj.weight", "mlp.up_proj.weight"), True, 1),
    ("mlp", "proj"): (("mlp.down_proj.weight",), True, None),
}


def layer_index(cfg: ModelConfig, path: tuple[Any, ...]) -> tuple[int, tuple[Any, ...]] | None:
    """(checkpoint layer, leaf within the block) of a block leaf's path; None for other leaves."""
    if path[:2] == ("core", "blocks"):
        return cfg.n_prelude + int(path[2]), path[3:]
    if path[0] == "prelude":
        return int(path[1]), path[2:]
    if path[0] == "coda":
        return cfg.n_prelude + cfg.n_core + int(path[1]), path[2:]
    return None


def _hf_names(cfg: ModelConfig, path: tuple[Any, ...]) -> tuple[tuple[str, ...], bool, int | None]:
    if path == ("wte",):
        return (WTE,), False, None
    if path == ("ln_f", "weight"):
        return (FINAL_NORM,), False, None
    if path == ("lm_head",):
        return (LM_HEAD,), True, None
    if path == ADAPTER:
        return (), False, None
    located = layer_index(cfg, path)
    if located is None or located[1] not in _BLOCK_KEYS:
        raise RuntimeError(f"rdlm params leaf {path} has no Llama counterpart; the key map in "
                           "rdlm/interop/llama_layout.py must follow rdlm/model/model.py.")
    layer, leaf = located
    suffixes, matrix, axis = _BLOCK_KEYS[leaf]
    return tuple(f"model.layers.{layer}.{s}" for s in suffixes), matrix, axis


def _path_keys(path: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def key_map(cfg: ModelConfig) -> tuple[list[Entry], Any]:
    """Every params leaf of ``cfg`` with its Hugging Face keys and shapes, and the params
    treedef (the adapter's entry has no names)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))
    entries = []
    for path, leaf in leaves:
        keys = _path_keys(path)
        names, matrix, axis = _hf_names(cfg, keys)
        shape = tuple(leaf.shape)
        part = shape if axis is None else shape[:axis] + shape[axis + 1:]
        if matrix:
            hf_shape = (math.prod(part[1:]), part[0])
        else:  # the embedding keeps its [V, d]; biases of [heads, head_dim] are flat
            hf_shape = part if keys == ("wte",) else (math.prod(part),)
        entries.append(Entry(keys, names, shape, tuple(hf_shape for _ in names), matrix, axis))
    return entries, treedef


def embedding_adapter(d_model: int, dtype: Any = np.float32) -> np.ndarray:
    """[0; I] ([2d, d]): the core reads only the prelude's output, never the state, so r = 1
    (and every r) computes exactly the checkpoint's fixed-depth network."""
    return np.concatenate([np.zeros((d_model, d_model)), np.eye(d_model)]).astype(dtype)


def layer_order(name: str) -> tuple[int, str]:
    """Sort key of tensors in a written file: embedding, layers 0.., final norm, head."""
    if name == WTE:
        return -1, name
    if name.startswith("model.layers."):
        return int(name.split(".")[2]), name
    return 1 << 30, name
