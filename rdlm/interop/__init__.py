"""Interoperability with the Hugging Face world: Huginn-0125 checkpoints (see docs/interop.md).

    cfg, params = rdlm.interop.load_huginn("huginn-0125/")      # safetensors -> params pytree
    rdlm.interop.save_huginn(cfg, params, "out/")               # params -> safetensors + config.json
    tok = rdlm.data.load_tokenizer("huginn-0125/")              # its tokenizer.json: text <-> ids
"""

from rdlm.interop.huginn import (HuginnFormatError, config_from_huginn, huginn_config, load_huginn,
                                 read_config, save_huginn)

__all__ = ["HuginnFormatError", "config_from_huginn", "huginn_config", "load_huginn",
           "read_config", "save_huginn"]
