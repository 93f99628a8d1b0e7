"""Continuous thought ("Coconut"): the latent forward (`thoughts`), the curriculum as a loss and a
stage schedule on the shared train loop (`curriculum`), and answers through the generation engine
(`generation`)."""

from rdlm.coconut.curriculum import (CoconutConfig, CoconutObjective, CoconutResult,
                                     load_coconut_config, train_coconut)
from rdlm.coconut.generation import evaluate_method
from rdlm.coconut.thoughts import Depth, coconut_loss, continuous_forward

__all__ = ["CoconutConfig", "CoconutObjective", "CoconutResult", "Depth", "coconut_loss",
           "continuous_forward", "evaluate_method", "load_coconut_config", "train_coconut"]
