"""Huginn-0125's ``config.json`` <-> `ModelConfig`: which keys are read, which values rdlm
implements (anything that selects other maths is refused), and the config.json written for the
original PyTorch code."""

from __future__ import annotations

import math
from typing import Any, Mapping

from rdlm.config import ConfigError, ModelConfig
from rdlm.interop.hf_io import FormatError, is_int

ARCHITECTURE = "RavenForCausalLM"
MODEL_TYPE = "huginn_raven"
# The Hugging Face repository that holds the original modelling code (raven_*_minimal.py).
CODE_REPO = "tomg-group-umd/huginn-0125"
CODE_FILES = ("raven_config_minimal.py", "raven_modeling_minimal.py")
CONFIG_FILE = "config.json"
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


class HuginnFormatError(FormatError):
    """A checkpoint or config does not match the Huginn-0125 format; the message lists every problem."""


def config_from_huginn(hf: Mapping[str, Any], *, dtype: str = "float32") -> ModelConfig:
    """The `ModelConfig` that a Huginn ``config.json`` (as a dict) describes.

    Raises `HuginnFormatError` listing every problem: an unknown architecture, a missing shape key,
    or a key whose value selects maths rdlm does not implement (another norm, injection, block
    class, untied embeddings, grouped-query attention, …). ``dtype`` is the compute dtype of the
    returned config (parameters are float32 unless `load_huginn` is told otherwise).
    """
    cfg, problems = parse_config(hf, dtype)
    if problems:
        raise HuginnFormatError("config.json", problems)
    return cfg


def parse_config(hf: Mapping[str, Any], dtype: str) -> tuple[ModelConfig | None, list[str]]:
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
        elif not is_int(hf[key]):
            problems.append(f"{key}={hf[key]!r} must be an integer.")
    if any(key not in hf or not is_int(hf[key]) for key in _REQUIRED):
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
    if not is_int(padded) or padded < vocab:
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
