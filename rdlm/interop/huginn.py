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
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from safetensors import safe_open

from rdlm.config import DTYPES, ConfigError, ModelConfig

ARCHITECTURE = "RavenForCausalLM"
MODEL_TYPE = "huginn_raven"
# The Hugging Face repository that holds the original modelling code (raven_*_minimal.py).
CODE_REPO = "tomg-group-umd/huginn-0125"
CODE_FILES = ("raven_config_minimal.py", "raven_modeling_minimal.py")
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Derived data (RoPE table) that the PyTorch model keeps as a persistent buffer.
FREQS_CIS = "freqs_cis"
LM_HEAD = "lm_head.weight"
WTE = "transformer.wte.weight"

# Keys of config.json that select a different computation: only these values are implemented.
# Anything else in config.json (auto_map, torch_dtype, generation defaults, init-only values, …)
# does not change the forward pass and is ignored.
_FIXED_VALUES: dict[str, tuple[Any, ...]] = {
    "architecture_class_name": ("RecurrentGPT",),
    "block_class_name": ("SandwichBlock",),
    "norm_class_name": ("RMSNorm_llama",),
    "mlp_class_name": ("GatedMLP",),
    "nonlin_name": ("SiLU",),
    "injection_type": ("linear",),
    "state_init": ("like-init",),
    "sampling_scheme": ("poisson-lognormal-filling",),
    "bias": (False,),
    "tie_embeddings": (True,),
    "tie_word_embeddings": (True,),
    "test_time_noise": (0, 0.0, None),
    "rope_scaling": (None,),
}
# Defaults of the original config class for keys a config.json may leave out.
_DEFAULTS: dict[str, Any] = {"block_size": 4096, "rope_base": 50_000.0, "norm_eps": 1e-6,
                             "qk_bias": True, "mean_recurrence": 32, "mean_backprop_depth": 8}
_REQUIRED = ("n_embd", "n_heads", "intermediate_size", "vocab_size", "n_layers_in_prelude",
             "n_layers_in_recurrent_block", "n_layers_in_coda")

# safetensors dtype names <-> numpy dtypes (bfloat16 comes from ml_dtypes, a jax dependency).
_ST_DTYPES = {"F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
              "BF16": np.dtype(jax.numpy.bfloat16)}
_TORCH_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class HuginnFormatError(ValueError):
    """A checkpoint or config does not match the Huginn-0125 format; the message lists every problem."""

    def __init__(self, where: str, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where}: {len(self.problems)} problem(s):\n{lines}")


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_from_huginn(hf: Mapping[str, Any], *, dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` that a Huginn ``config.json`` (as a dict) describes.

    Raises `HuginnFormatError` listing every problem: an unknown architecture, a missing shape key,
    or a key whose value selects maths rdlm does not implement (another norm, injection, block
    class, untied embeddings, grouped-query attention, …). ``dtype`` is the compute dtype of the
    returned config (parameters are float32 unless `load_huginn` is told otherwise).
    """
    cfg, problems = _parse_config(hf, dtype)
    if problems:
        raise HuginnFormatError("config.json", problems)
    return cfg


def _parse_config(hf: Mapping[str, Any], dtype: str) -> tuple[ModelConfig | None, list[str]]:
    """(config, problems); the config is built whenever the shape keys allow, even if other keys
    are refused, so that tensor names and shapes can still be checked against it."""
    problems: list[str] = []
    architectures = hf.get("architectures")
    model_type = hf.get("model_type")
    if architectures is None and model_type is None:
        problems.append(f"config.json names no architecture: expected \"architectures\": "
                        f"[\"{ARCHITECTURE}\"] and/or \"model_type\": \"{MODEL_TYPE}\".")
    if architectures is not None and (not isinstance(architectures, list)
                                      or architectures != [ARCHITECTURE]):
        problems.append(f"architectures={architectures!r} is unknown: only [\"{ARCHITECTURE}\"] "
                        "(Huginn-0125) can be converted.")
    if model_type is not None and model_type != MODEL_TYPE:
        problems.append(f"model_type={model_type!r} is unknown: expected {MODEL_TYPE!r}.")
    for key, allowed in _FIXED_VALUES.items():
        if key in hf and hf[key] not in allowed:
            problems.append(f"{key}={hf[key]!r} changes the computation and is not supported: "
                            f"rdlm implements only {' or '.join(map(repr, allowed))}.")
    for key in _REQUIRED:
        if key not in hf:
            problems.append(f"config.json lacks {key!r}.")
        elif not _is_int(hf[key]):
            problems.append(f"{key}={hf[key]!r} must be an integer.")
    if any(key not in hf or not _is_int(hf[key]) for key in _REQUIRED):
        return None, problems

    d, heads = hf["n_embd"], hf["n_heads"]
    head_dim = d // heads if heads > 0 else 0

    def expect(key: str, value: Any, why: str) -> None:
        if key in hf and hf[key] != value:
            problems.append(f"{key}={hf[key]!r} disagrees with {why} (expected {value!r}).")

    expect("num_key_value_heads", heads, "n_heads: grouped-query attention is not supported")
    expect("num_attention_heads", heads, "n_heads")
    expect("hidden_size", d, "n_embd")
    expect("head_dim", head_dim, "n_embd / n_heads")
    n_layers = hf["n_layers_in_prelude"] + hf["n_layers_in_recurrent_block"] + hf["n_layers_in_coda"]
    expect("n_layers", n_layers, "prelude + recurrent + coda layers")
    expect("num_hidden_layers", n_layers, "prelude + recurrent + coda layers")
    vocab = hf["vocab_size"]
    padded = hf.get("padded_vocab_size", vocab)
    if not _is_int(padded) or padded < vocab:
        problems.append(f"padded_vocab_size={padded!r} must be an integer >= vocab_size={vocab}.")
        padded = vocab
    init_values = hf.get("init_values")
    if init_values is not None and d > 0:
        # The original multiplies embeddings (and the random initial state) by embed_scale and draws
        # that state with std: both are part of the computation, fixed to these values in rdlm.
        for name, want in (("embed_scale", math.sqrt(d)), ("std", math.sqrt(2 / (5 * d)))):
            got = init_values.get(name, want) if isinstance(init_values, Mapping) else None
            if not isinstance(got, (int, float)) or abs(got - want) > 1e-6 * want:
                problems.append(f"init_values.{name}={got!r} is not supported: rdlm uses "
                                f"{want!r} for n_embd={d}.")
    values = {key: hf.get(key, default) for key, default in _DEFAULTS.items()}
    if not isinstance(values["qk_bias"], bool):
        problems.append(f"qk_bias={values['qk_bias']!r} must be true or false.")
    cfg = None
    try:
        cfg = ModelConfig(
            vocab_size=padded, d_model=d, n_heads=heads, mlp_dim=hf["intermediate_size"],
            n_prelude=hf["n_layers_in_prelude"], n_core=hf["n_layers_in_recurrent_block"],
            n_coda=hf["n_layers_in_coda"], max_seq_len=values["block_size"],
            rope_base=float(values["rope_base"]), norm_eps=float(values["norm_eps"]),
            qk_bias=bool(values["qk_bias"]), mean_recurrence=values["mean_recurrence"],
            backprop_depth=values["mean_backprop_depth"], dtype=dtype)
    except (ConfigError, TypeError, ValueError) as err:
        problems.append(f"config.json describes an invalid model: {err}")
    return cfg, problems


def huginn_config(cfg: ModelConfig, *, torch_dtype: str = "float32",
                  code_repo: str | None = None) -> dict[str, Any]:
    """The ``config.json`` dict for ``cfg``, loadable by the original PyTorch code.

    ``auto_map`` points, as in the released config.json, at ``raven_config_minimal.py`` /
    ``raven_modeling_minimal.py`` next to config.json; with ``code_repo`` (e.g. `CODE_REPO`) it
    points at that Hugging Face repository instead (``transformers`` fetches the code with
    ``trust_remote_code=True``).
    Token ids and ``tie_word_embeddings`` are left out on purpose: the original config class sets
    them itself and fails if config.json repeats them.
    """
    prefix = f"{code_repo}--" if code_repo else ""
    d = cfg.d_model
    std = math.sqrt(2 / (5 * d))
    n_layers = cfg.n_prelude + cfg.n_core + cfg.n_coda
    rope_base = int(cfg.rope_base) if float(cfg.rope_base).is_integer() else cfg.rope_base
    return {
        "architectures": [ARCHITECTURE],
        "auto_map": {"AutoConfig": f"{prefix}raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": f"{prefix}raven_modeling_minimal.RavenForCausalLM"},
        "model_type": MODEL_TYPE,
        "torch_dtype": torch_dtype,
        "activation_checkpoint_impl": "per-iteration",
        "architecture_class_name": "RecurrentGPT",
        "bias": False,
        "block_class_name": "SandwichBlock",
        "block_size": cfg.max_seq_len,
        "effective_expected_depth": int(cfg.effective_depth),
        "head_dim": cfg.head_dim,
        "init_orthogonal": False,
        "init_strategy": "takase",
        "init_values": {"std": std, "out_proj": std / math.sqrt(2 * cfg.effective_depth),
                        "embedding": std, "embed_scale": math.sqrt(d)},
        "injection_type": "linear",
        "intermediate_size": cfg.mlp_dim,
        "mean_backprop_depth": cfg.backprop_depth,
        "mean_recurrence": cfg.mean_recurrence,
        "mlp_class_name": "GatedMLP",
        "n_embd": d,
        "n_heads": cfg.n_heads,
        "n_layers": n_layers,
        "n_layers_in_coda": cfg.n_coda,
        "n_layers_in_prelude": cfg.n_prelude,
        "n_layers_in_recurrent_block": cfg.n_core,
        "nonlin_name": "SiLU",
        "norm_class_name": "RMSNorm_llama",
        "norm_eps": cfg.norm_eps,
        "num_key_value_heads": cfg.n_heads,
        "padded_vocab_size": cfg.vocab_size,
        "qk_bias": cfg.qk_bias,
        "rope_base": rope_base,
        "sampling_scheme": "poisson-lognormal-filling",
        "state_init": "like-init",
        "test_time_noise": 0.0,
        "test_time_noise_type": "none",
        "tie_embeddings": True,
        "vocab_size": cfg.vocab_size,
    }


# ---------------------------------------------------------------------------------------------
# The key map: one entry per params leaf.


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
                           "rdlm/interop/huginn.py must follow rdlm/model.py.")
    suffix, matrix = _BLOCK_KEYS[rest]
    return f"transformer.{stack}.{index}.{suffix}", matrix


def _path_keys(path: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def key_map(cfg: ModelConfig) -> tuple[list[Entry], Any]:
    """Every params leaf of ``cfg`` with its Hugging Face key and shapes, and the params treedef."""
    import rdlm.model  # a heavy import, deferred so that `--help` and config checks stay fast

    leaves, treedef = jax.tree_util.tree_flatten_with_path(rdlm.model.abstract_params(cfg))
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


# ---------------------------------------------------------------------------------------------
# Reading


class _TensorInfo(NamedTuple):
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]


def _read_json(path: Path, what: str, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{what} {str(path)!r} does not exist.")
    except (OSError, ValueError) as err:
        problems.append(f"{what} {str(path)!r} is not valid JSON: {err}")
    return None


def _scan_files(directory: Path, problems: list[str]) -> dict[str, _TensorInfo]:
    """Name, dtype and shape of every tensor, from the safetensors headers only."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path, "index", problems)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            if index is not None:
                problems.append(f"{INDEX_FILE} has no \"weight_map\" mapping tensor names to files.")
            return {}
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).exists():
        weight_map, files = None, [SINGLE_FILE]
    else:
        present = sorted(p.name for p in directory.glob("*.safetensors"))
        problems.append(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(directory)!r}"
                        + (f" (found {present})" if present else "") + ".")
        return {}
    tensors: dict[str, _TensorInfo] = {}
    for file_name in files:
        file = directory / file_name
        if not file.exists():
            problems.append(f"{INDEX_FILE} lists {file_name!r}, which does not exist.")
            continue
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    info = _TensorInfo(file, view.get_dtype(), tuple(view.get_shape()))
                    if name in tensors:
                        problems.append(f"{name} appears in both {tensors[name].file.name} and "
                                        f"{file_name}.")
                    elif weight_map is not None and weight_map.get(name) != file_name:
                        problems.append(f"{name} is in {file_name} but {INDEX_FILE} lists "
                                        f"{weight_map.get(name)!r} for it.")
                    tensors[name] = info
        except Exception as err:  # safetensors raises its own error types for corrupt files
            problems.append(f"{file_name} is not a readable safetensors file: {err}")
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in tensors and (directory / file_name).exists():
                problems.append(f"{INDEX_FILE} lists {name} in {file_name}, which lacks it.")
    return tensors


def _limited(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def _check_tensors(entries: list[Entry], tensors: Mapping[str, _TensorInfo], cfg: ModelConfig,
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
    for name, info in tensors.items():
        if name in shape_of and info.shape != shape_of[name]:
            problems.append(f"{name} has shape {list(info.shape)} in {info.file.name}, but "
                            f"config.json implies {list(shape_of[name])}.")
        if name in shape_of and info.dtype not in _ST_DTYPES:
            problems.append(f"{name} has dtype {info.dtype}; only {sorted(_ST_DTYPES)} "
                            "floating-point tensors can be converted.")
    both = [tensors.get(WTE), tensors.get(LM_HEAD)]
    comparable = all(t is not None and t.shape == shape_of[LM_HEAD] and t.dtype in _ST_DTYPES
                     for t in both)
    if comparable and not _same_values(tensors[WTE], WTE, tensors[LM_HEAD], LM_HEAD):
        problems.append(f"{LM_HEAD} differs from {WTE}: untied output embeddings are not "
                        "supported (rdlm ties the head to the embedding, as Huginn-0125 does).")


def _source(name: str, tensors: Mapping[str, _TensorInfo]) -> str:
    """Where a tensor is read from: the embedding may be stored only under the tied head's name."""
    return LM_HEAD if name == WTE and WTE not in tensors else name


def _same_values(a: _TensorInfo, a_name: str, b: _TensorInfo, b_name: str,
                 rows: int = 4096) -> bool:
    """Compare two [rows, d] tensors a block of rows at a time (as float32)."""
    with safe_open(a.file, framework="numpy") as fa, safe_open(b.file, framework="numpy") as fb:
        sa, sb = fa.get_slice(a_name), fb.get_slice(b_name)
        for start in range(0, a.shape[0], rows):
            stop = min(start + rows, a.shape[0])
            block_a = np.asarray(sa[start:stop], np.float32)
            if not np.array_equal(block_a, np.asarray(sb[start:stop], np.float32)):
                return False
    return True


def _read(info: _TensorInfo, name: str) -> np.ndarray:
    # One open per tensor: the file's pages are unmapped again before the next tensor is read.
    with safe_open(info.file, framework="numpy") as f:
        return f.get_tensor(name)


def _place(array: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    # Works for shardings that span several hosts: each process supplies only its own shards.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _resolve_shardings(cfg: ModelConfig, entries: list[Entry], treedef: Any, shardings: Any,
                       mesh: Any) -> list[Any]:
    if shardings is not None and mesh is not None:
        raise ValueError("give shardings= or mesh=, not both.")
    if mesh is not None:
        from rdlm.runtime import sharding as rdlm_sharding  # written alongside the training code
        shardings = rdlm_sharding.param_shardings(cfg, mesh)
    if shardings is None:
        return [None] * len(entries)
    if isinstance(shardings, jax.sharding.Sharding):
        return [shardings] * len(entries)
    leaves, tree = jax.tree.flatten(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if tree != treedef:
        raise ValueError("shardings must mirror the params pytree of the checkpoint's config "
                         f"(rdlm.abstract_params(cfg)); got structure {tree}.")
    return leaves


def read_config(path: str | os.PathLike, *, dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a Huginn checkpoint directory (reads only config.json)."""
    directory = Path(path)
    problems: list[str] = []
    hf = _read_json(directory / CONFIG_FILE, "config", problems)
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
    hf = _read_json(directory / CONFIG_FILE, "config", problems)
    cfg = None
    if isinstance(hf, dict):
        cfg, config_problems = _parse_config(hf, compute_dtype)
        problems.extend(config_problems)
    elif hf is not None:
        problems.append("config.json must hold a JSON object.")
    tensors = _scan_files(directory, problems)
    if cfg is not None:
        entries, treedef = key_map(cfg)
        _check_tensors(entries, tensors, cfg, problems)
    if problems:
        raise HuginnFormatError(str(directory), problems)

    placements = _resolve_shardings(cfg, entries, treedef, shardings, mesh)
    leaves = []
    for entry, sharding in zip(entries, placements):
        name = _source(entry.name, tensors)
        hf_array = _read(tensors[name], name)
        array = np.ascontiguousarray(entry.to_rdlm(hf_array.astype(target, copy=False)))
        del hf_array
        leaves.append(_place(array, sharding))
        del array
    return cfg, jax.tree.unflatten(treedef, leaves)


# ---------------------------------------------------------------------------------------------
# Writing


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be positive.")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} is invalid: use bytes or e.g. '5GB', '500MB'.")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = int(float(match.group(1)) * units[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive.")
    return value


class _OutTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]  # produces the array (in `dtype`) when it is written

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _st_name(dtype: np.dtype) -> str:
    return {v: k for k, v in _ST_DTYPES.items()}[np.dtype(dtype)]


def _write_safetensors(file: Path, tensors: Sequence[_OutTensor]) -> None:
    """A safetensors file written tensor by tensor, so only one tensor is ever in host memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _st_name(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            array = np.ascontiguousarray(t.fetch(), dtype=t.dtype)
            if array.shape != t.shape:
                raise RuntimeError(f"{t.name}: produced shape {array.shape}, planned {t.shape}.")
            if array.dtype.byteorder == ">":
                array = array.byteswap().view(array.dtype.newbyteorder("<"))
            f.write(array.view(np.uint8).reshape(-1).data)
            del array


def _plan_shards(tensors: Sequence[_OutTensor], max_bytes: int) -> list[list[_OutTensor]]:
    shards: list[list[_OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _to_host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


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


def _commit_dir(tmp: Path, final: Path, overwrite: bool) -> None:
    if final.exists():
        if not overwrite:
            raise FileExistsError(f"{str(final)!r} exists; pass overwrite=True to replace it.")
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_huginn(cfg: ModelConfig, params: Any, path: str | os.PathLike, *,
                max_shard_size: int | str = "5GB", dtype: str = "float32",
                code_repo: str | None = None, include_lm_head: bool = False,
                include_freqs_cis: bool = True, overwrite: bool = False,
                extra_files: Mapping[str, str | os.PathLike] | None = None) -> Path:
    """Write ``params`` as a Huginn-0125-format checkpoint directory that the original PyTorch
    code (``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``) loads.

    - ``max_shard_size``: above it the weights are split into ``model-0000k-of-0000n.safetensors``
      with a ``model.safetensors.index.json``; below it one ``model.safetensors``.
    - ``dtype``: ``"float32"`` (exact), ``"bfloat16"`` (as released) or ``"float16"``.
    - ``code_repo``: see `huginn_config`; ``include_lm_head`` writes the tied head as a second copy;
      ``include_freqs_cis`` writes the RoPE buffer the PyTorch model expects in its state dict.
    - ``extra_files``: ``{name: source}`` copied into the directory too (``tokenizer.json``, or
      the two ``raven_*_minimal.py`` files of the release, which make the directory loadable
      offline with ``trust_remote_code=True``).

    The directory is assembled under a temporary name beside ``path`` and renamed into place, so an
    interrupted save leaves no partial checkpoint. In a multi-process run every process must call
    this (parameters are gathered collectively); process 0 writes.
    """
    if dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is invalid: use one of {sorted(_TORCH_DTYPE_NAMES)}.")
    if getattr(cfg, "model", cfg).token_shift:
        raise ValueError("model.token_shift is an rdlm extension that the Huginn-0125 format "
                         "cannot hold; only models trained with token_shift=0 can be exported.")
    max_bytes = parse_size(max_shard_size)
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{str(final)!r} exists; pass overwrite=True to replace it.")
    entries, treedef = key_map(cfg)
    leaves = _check_params(cfg, entries, treedef, params)
    out_dtype = _ST_DTYPES[_TORCH_DTYPE_NAMES[dtype]]

    def fetch(entry: Entry, leaf: Any) -> Callable[[], np.ndarray]:
        return lambda: entry.to_hf(_to_host(leaf)).astype(out_dtype)

    tensors = [_OutTensor(e.name, e.hf_shape, out_dtype, fetch(e, leaf))
               for e, leaf in zip(entries, leaves)]
    # Module order of the PyTorch model (wte, prelude, adapter, core, coda, ln_f) for readability.
    order = {"wte": 0, "prelude": 1, "adapter": 2, "core_block": 3, "coda": 4, "ln_f": 5}
    tensors.sort(key=lambda t: (order[t.name.split(".")[1]],
                                int(t.name.split(".")[2]) if t.name.split(".")[2].isdigit() else 0))
    if include_lm_head:
        wte = next(t for t in tensors if t.name == WTE)
        tensors.append(_OutTensor(LM_HEAD, wte.shape, out_dtype, wte.fetch))
    if include_freqs_cis:
        table = freqs_cis(cfg)
        tensors.append(_OutTensor(FREQS_CIS, table.shape, table.dtype, lambda: table))

    extra = {name: Path(source) for name, source in (extra_files or {}).items()}
    absent = [str(source) for source in extra.values() if not source.is_file()]
    if absent:
        raise FileNotFoundError(f"extra files do not exist: {absent}.")
    writer = jax.process_index() == 0
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if writer:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        shards = _plan_shards(tensors, max_bytes)
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for shard, name in zip(shards, names):
            if writer:
                _write_safetensors(tmp / name, shard)
            else:  # gather collectively, in the same order as the writer
                for t in shard:
                    t.fetch()
        if writer:
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                         "weight_map": {t.name: n for s, n in zip(shards, names) for t in s}}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            config = huginn_config(cfg, torch_dtype=dtype, code_repo=code_repo)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            for name, source in extra.items():
                shutil.copyfile(source, tmp / name)
            _commit_dir(tmp, final, overwrite)
    finally:
        if writer and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"save_huginn:{final}")
    return final
