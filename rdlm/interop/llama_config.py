"""A Llama-family ``config.json`` <-> `ModelConfig` with ``block="llama"``: which architectures
and keys are read, which values rdlm implements (anything that selects other maths is refused),
the prelude/core/coda split of the checkpoint's layers, and the config.json written for
``transformers``' ``LlamaForCausalLM``.

Both spellings of RoPE settings are read: ``rope_theta`` + ``rope_scaling`` (transformers 4) and
``rope_parameters`` (transformers 5, which holds the base as ``rope_theta`` and the type as
``rope_type``).
"""

from __future__ import annotations

from typing import Any, Mapping

from rdlm.config import ConfigError, ModelConfig
from rdlm.interop.hf_io import FormatError, is_int

CONFIG_FILE = "config.json"
ARCHITECTURE = "LlamaForCausalLM"
# Architectures whose decoder layer is exactly the llama block (pre-norm RMSNorm, grouped-query
# attention with rotate-half RoPE, SwiGLU with separate gate/up, optional q/k/v/o biases) under
# the same tensor names; Mistral only without a sliding window, checked below.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
# rope types of transformers' ROPE_INIT_FUNCTIONS that rdlm computes, and the name rdlm uses.
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
# Keys that would select different maths: only these values are implemented. Everything else
# (initializer_range, use_cache, token ids, pretraining_tp — a slicing of the same matmuls —,
# attention_dropout at inference, …) leaves the forward pass unchanged and is ignored.
_FIXED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "mlp_bias": (False,),
    "partial_rotary_factor": (1, 1.0),
    "quantization_config": (None,),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")
# Defaults of transformers' LlamaConfig for keys a config.json may leave out.
_DEFAULTS: dict[str, Any] = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                             "attention_bias": False, "tie_word_embeddings": False,
                             "rope_theta": 10_000.0}


class LlamaFormatError(FormatError):
    """A checkpoint or config does not match what the llama block can hold; the message lists
    every problem."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_architecture(hf: Mapping[str, Any], problems: list[str]) -> None:
    architectures, model_type = hf.get("architectures"), hf.get("model_type")
    known = ", ".join(ARCHITECTURES)
    if architectures is None and model_type is None:
        problems.append(f"config.json names no architecture: expected \"architectures\": "
                        f"[\"{ARCHITECTURE}\"] and/or \"model_type\": \"llama\".")
    if architectures is not None and (not isinstance(architectures, list) or len(architectures) != 1
                                      or architectures[0] not in ARCHITECTURES):
        problems.append(f"architectures={architectures!r} is not supported: only {known} (the "
                        "same decoder layer as Llama's) can be converted.")
    elif architectures is not None and model_type is not None \
            and model_type != ARCHITECTURES[architectures[0]]:
        problems.append(f"model_type={model_type!r} disagrees with architectures="
                        f"{architectures!r} (expected {ARCHITECTURES[architectures[0]]!r}).")
    if architectures is None and model_type not in (None, *ARCHITECTURES.values()):
        problems.append(f"model_type={model_type!r} is not supported: only "
                        f"{sorted(set(ARCHITECTURES.values()))} can be converted.")
    window = hf.get("sliding_window")
    if window is not None and not (is_int(window) and is_int(hf.get("max_position_embeddings"))
                                   and window >= hf["max_position_embeddings"]):
        problems.append(f"sliding_window={window!r} is not supported: rdlm's llama block attends "
                        "to the whole context (a checkpoint without a sliding window, or with one "
                        "at least max_position_embeddings long, converts).")


def rope_settings(hf: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The `ModelConfig` RoPE fields of a config.json (either spelling); unsupported scalings
    are added to ``problems``."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, Mapping) or "rope_type" not in params:
            problems.append(f"rope_parameters={params!r} is not supported: expected one mapping "
                            "with a rope_type (per-layer-type RoPE is another architecture).")
            return {}
        scaling, theta = params, params.get("rope_theta", hf.get("rope_theta"))
    else:
        scaling, theta = hf.get("rope_scaling"), hf.get("rope_theta")
    theta = _DEFAULTS["rope_theta"] if theta is None else theta
    if not _is_number(theta) or theta <= 1:
        problems.append(f"rope_theta={theta!r} must be a number > 1.")
        theta = _DEFAULTS["rope_theta"]
    out: dict[str, Any] = {"rope_base": float(theta), "rope_scaling": "none"}
    if scaling is None:
        return out
    if not isinstance(scaling, Mapping):
        problems.append(f"rope_scaling={scaling!r} must be a mapping or null.")
        return out
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        problems.append(f"RoPE scaling type {kind!r} is not supported: rdlm implements "
                        f"{sorted(_ROPE_TYPES)} (convert a checkpoint without it, or add it to "
                        "rdlm.model.attention.rope_frequencies).")
        return out
    out["rope_scaling"] = _ROPE_TYPES[kind]
    keys = {"linear": {"factor": "rope_scaling_factor"},
            "llama3": {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                       "high_freq_factor": "rope_high_freq_factor",
                       "original_max_position_embeddings": "rope_original_max_len"}}
    for hf_key, field in keys.get(kind, {}).items():
        value = scaling.get(hf_key)
        if not _is_number(value):
            problems.append(f"RoPE scaling {kind!r} needs a number for {hf_key!r}, got {value!r}.")
        else:
            out[field] = int(value) if field == "rope_original_max_len" else float(value)
    return out


def check_split(n_layers: int, prelude: Any, core: Any) -> list[str]:
    """Problems with putting ``prelude`` layers before a core of ``core`` layers, the rest after."""
    problems = []
    if not is_int(prelude) or prelude < 0:
        problems.append(f"prelude={prelude!r} must be an integer >= 0 (the layers before the "
                        "recurrent core).")
    if not is_int(core) or core < 1:
        problems.append(f"core={core!r} must be an integer >= 1 (the layers iterated r times).")
    if not problems and prelude + core > n_layers:
        problems.append(f"prelude {prelude} + core {core} = {prelude + core} layers, but the "
                        f"checkpoint has {n_layers} (num_hidden_layers): choose prelude + core "
                        f"<= {n_layers}; the coda gets the remaining layers.")
    return problems


def parse_config(hf: Mapping[str, Any], prelude: Any, core: Any, dtype: str = "float32"
                 ) -> tuple[ModelConfig | None, list[str]]:
    """(config, problems). The config is built whenever the shape keys and the split allow, even
    if other keys are refused, so that tensor names and shapes can still be checked against it."""
    problems: list[str] = []
    _check_architecture(hf, problems)
    for key, allowed in _FIXED_VALUES.items():
        if key in hf and hf[key] not in allowed:
            problems.append(f"{key}={hf[key]!r} changes the computation and is not supported: "
                            f"rdlm's llama block implements only {' or '.join(map(repr, allowed))}.")
    rope = rope_settings(hf, problems)
    for key in _REQUIRED:
        if key not in hf:
            problems.append(f"config.json lacks {key!r}.")
        elif not is_int(hf[key]) or hf[key] < 1:
            problems.append(f"{key}={hf[key]!r} must be a positive integer.")
    if any(key not in hf or not is_int(hf[key]) or hf[key] < 1 for key in _REQUIRED):
        return None, problems
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    kv_ok = is_int(kv_heads) and heads % kv_heads == 0
    if not kv_ok:
        problems.append(f"num_key_value_heads={kv_heads!r} must divide num_attention_heads="
                        f"{heads}.")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != d:
        problems.append(f"head_dim={head_dim!r} is not hidden_size / num_attention_heads = "
                        f"{d / heads:g}: rdlm's attention keeps heads × head_dim = hidden_size.")
    values = {key: hf.get(key, default) for key, default in _DEFAULTS.items()}
    for key in ("attention_bias", "tie_word_embeddings"):
        if not isinstance(values[key], bool):
            problems.append(f"{key}={values[key]!r} must be true or false.")
    split_problems = check_split(hf["num_hidden_layers"], prelude, core)
    problems.extend(split_problems)
    if split_problems or not kv_ok:
        return None, problems
    try:
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"], d_model=d, n_heads=heads, mlp_dim=hf["intermediate_size"],
            n_prelude=prelude, n_core=core, n_coda=hf["num_hidden_layers"] - prelude - core,
            max_seq_len=values["max_position_embeddings"],
            norm_eps=float(values["rms_norm_eps"]), qk_bias=False, dtype=dtype,
            block="llama", n_kv_heads=kv_heads, attn_bias=bool(values["attention_bias"]),
            tie_embeddings=bool(values["tie_word_embeddings"]), adapter_init="embedding",
            **rope)
    except (ConfigError, TypeError, ValueError) as err:
        problems.append(f"config.json describes a model rdlm cannot build: {err}")
        return None, problems
    return cfg, problems


def config_from_llama(hf: Mapping[str, Any], *, prelude: int, core: int,
                      dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` of a Llama-family ``config.json`` (as a dict) whose layers [0, prelude)
    become the prelude, [prelude, prelude + core) the recurrent core and the rest the coda.

    Raises `LlamaFormatError` listing every problem: an unsupported architecture, a missing shape
    key, a key whose value selects maths rdlm does not implement (another activation, MLP biases,
    a RoPE scaling other than linear/llama3, head_dim ≠ hidden/heads, a sliding window, …) or a
    split that does not fit the layers. ``dtype`` is the compute dtype of the returned config.
    """
    cfg, problems = parse_config(hf, prelude, core, dtype)
    if problems:
        raise LlamaFormatError(CONFIG_FILE, problems)
    assert cfg is not None
    return cfg


def llama_config(cfg: ModelConfig, *, torch_dtype: str = "float32",
                 token_ids: Mapping[str, int | list[int]] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``cfg``'s layers as one fixed-depth ``LlamaForCausalLM``
    (prelude, core and coda consecutively). The RoPE settings are written in both spellings,
    so transformers 4 and 5 read them. ``token_ids``: ``bos_token_id`` / ``eos_token_id`` /
    ``pad_token_id`` to record."""
    scaling: dict[str, Any] | None = None
    if cfg.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
    theta = int(cfg.rope_base) if float(cfg.rope_base).is_integer() else cfg.rope_base
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_prelude + cfg.n_core + cfg.n_coda,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.attn_bias,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta},
        **dict(token_ids or {}),
    }
