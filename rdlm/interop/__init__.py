"""Interoperability with the Hugging Face world: Huginn-0125 checkpoints and tokenizer.json.

    cfg, params = rdlm.interop.load_huginn("huginn-0125/")      # safetensors -> params pytree
    rdlm.interop.save_huginn(cfg, params, "out/")               # params -> safetensors + config.json
    tok = rdlm.interop.load_tokenizer("huginn-0125/")           # text <-> ids, special ids
"""

from rdlm.interop.huginn import (HuginnFormatError, config_from_huginn, huginn_config, load_huginn,
                                 read_config, save_huginn)
from rdlm.interop.tokenizer import Tokenizer, load_tokenizer

__all__ = ["HuginnFormatError", "Tokenizer", "config_from_huginn", "huginn_config", "load_huginn",
           "load_tokenizer", "read_config", "save_huginn"]
