"""Generation: one jitted program per plan, prompts in and tokens out (`generate`), with adaptive
exit (`exits`), KV-cache sharing (`cache`), continuous chain of thought and self-speculative
decoding (`programs`), continuous thoughts in the prompt (`ThoughtConfig`), on the engine that runs
a block of positions through the model (`engine`); depth-continuous batching, every row at its own
token and iteration with a queue of prompts (`continuous`, on the per-row engine in `rows`); text
in and out with a tokenizer; task accuracy for several r (`evaluate`).
"""

from rdlm.generation.api import GenerateOutput, generate
from rdlm.generation.exits import ExitConfig
from rdlm.generation.plan import SamplingConfig, SpeculativeConfig, ThoughtConfig

__all__ = ["ExitConfig", "GenerateOutput", "SamplingConfig", "SpeculativeConfig", "ThoughtConfig",
           "generate"]
