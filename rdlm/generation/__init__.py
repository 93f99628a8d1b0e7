"""Generation: one jitted program per plan, prompts in and tokens out (`generate`), with adaptive
exit (`exits`), KV-cache sharing (`cache`), continuous chain of thought and self-speculative
decoding (`programs`), on the engine that runs a block of positions through the model (`engine`).
"""

from rdlm.generation.api import GenerateOutput, generate
from rdlm.generation.exits import ExitConfig
from rdlm.generation.plan import SamplingConfig, SpeculativeConfig

__all__ = ["ExitConfig", "GenerateOutput", "SamplingConfig", "SpeculativeConfig", "generate"]
