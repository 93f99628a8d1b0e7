"""rdlm: recurrent-depth ("latent reasoning") language models in JAX/Flax.

The pure-functional API works on one nested-dict params pytree::

    import jax, rdlm
    cfg = rdlm.model_preset("tiny")
    params = rdlm.init_params(cfg, jax.random.key(0))
    logits, aux = rdlm.forward(params, tokens_bt, cfg, num_steps=8, init_scale=0.0)

``import rdlm`` loads the model and generation only; training, continuous thought, data and
checkpoints load when first used (``rdlm.train``, ``rdlm.coconut``, ``rdlm.data``, ...).
"""

import importlib
from typing import Any

from rdlm.config import Config, MeshConfig, ModelConfig, model_preset
from rdlm.config_files import load_config
from rdlm.errors import ConfigError
from rdlm.generation import ExitConfig, GenerateOutput, SpeculativeConfig, generate
from rdlm.model import (AttentionContext, abstract_params, attention_context, bind, core_step,
                        count_params, expected_depth, flops, forward, forward_train, init_params,
                        initial_state, lm_loss, param_axes, sample_depth)

# Names served from subpackages that pull in heavier dependencies (grain, orbax, safetensors):
# imported on first use.
_LAZY = {
    "CoconutConfig": "rdlm.coconut", "continuous_forward": "rdlm.coconut",
    "evaluate_method": "rdlm.coconut", "load_coconut_config": "rdlm.coconut",
    "train_coconut": "rdlm.coconut",
}
# The library's own layers; the command line (rdlm.cli) and benchmarks (rdlm.bench) sit on top of
# it and are imported by name, never through the library.
_SUBPACKAGES = ("coconut", "data", "generation", "interop", "lm_eval", "model", "runtime", "train")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"rdlm.{name}")
    raise AttributeError(f"module 'rdlm' has no attribute {name!r}")


__all__ = [
    "AttentionContext", "Config", "ConfigError", "MeshConfig", "ModelConfig", "abstract_params",
    "attention_context", "bind", "core_step", "count_params", "expected_depth", "flops", "forward",
    "forward_train", "init_params", "initial_state", "lm_loss", "load_config", "model_preset",
    "param_axes", "sample_depth",
    "ExitConfig", "GenerateOutput", "SpeculativeConfig", "generate",
    *_LAZY,
]
