"""Interoperability with the Hugging Face world: Huginn-0125 checkpoints (see docs/interop.md)
and Llama-family checkpoints retrofitted with recurrence (see docs/retrofit.md).

    cfg, params = rdlm.interop.load_huginn("huginn-0125/")      # safetensors -> params pytree
    rdlm.interop.save_huginn(cfg, params, "out/")               # params -> safetensors + config.json
    tok = rdlm.data.load_tokenizer("huginn-0125/")              # its tokenizer.json: text <-> ids
    cfg, params = rdlm.interop.load_llama("tinyllama/", prelude=4, core=14)  # layers -> P/C/C
    rdlm.interop.save_llama(cfg, params, "out/")                # [0; I] adapter: fixed depth
"""

from rdlm.interop.huginn import (HuginnFormatError, config_from_huginn, huginn_config, load_huginn,
                                 read_config, save_huginn)
from rdlm.interop.llama import (LlamaFormatError, config_from_llama, fixed_depth_problems,
                                llama_config, load_llama, read_llama_config, save_llama)

__all__ = ["HuginnFormatError", "LlamaFormatError", "config_from_huginn", "config_from_llama",
           "fixed_depth_problems", "huginn_config", "llama_config", "load_huginn", "load_llama",
           "read_config", "read_llama_config", "save_huginn", "save_llama"]
