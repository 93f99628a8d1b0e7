"""rdlm: recurrent-depth ("latent reasoning") language models in JAX/Flax.

The pure-functional API works on one nested-dict params pytree::

    import jax, rdlm
    cfg = rdlm.model_preset("tiny")
    params = rdlm.init_params(cfg, jax.random.key(0))
    logits, aux = rdlm.forward(params, tokens_bt, cfg, num_steps=8, init_scale=0.0)
"""

from rdlm import flops, interop
from rdlm.config import (Config, ConfigError, MeshConfig, ModelConfig, load_config, model_preset)
from rdlm.model import (AttentionContext, abstract_params, attention_context, bind, core_step,
                        count_params, forward, forward_train, init_params, initial_state, lm_loss,
                        param_axes)
from rdlm.recurrence import expected_depth, sample_depth
from rdlm.exits import ExitConfig
from rdlm.sample import GenerateOutput, SpeculativeConfig, generate
from rdlm.coconut import (CoconutConfig, continuous_forward, evaluate_method, load_coconut_config,
                          train_coconut)

__all__ = [
    "AttentionContext", "Config", "ConfigError", "MeshConfig", "ModelConfig", "abstract_params",
    "attention_context", "bind", "core_step", "count_params", "expected_depth", "flops", "forward",
    "forward_train", "init_params", "initial_state", "lm_loss", "load_config", "model_preset",
    "param_axes", "sample_depth", "interop",
    "ExitConfig", "GenerateOutput", "SpeculativeConfig", "generate",
    "CoconutConfig", "continuous_forward", "evaluate_method", "load_coconut_config",
    "train_coconut",
]
