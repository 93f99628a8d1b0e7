"""Data: grain pipelines, synthetic reasoning tasks, the tokenizer interface and token sources
(see docs/data.md).

The pipeline functions load grain (~0.3 s) when first used, so that the tasks, rendering and
tokenizers (``from rdlm.data import load_tokenizer``) stay light for sampling and notebooks.
"""

import importlib
from typing import Any

from rdlm.data.render import parse_answer, prompt_tokens, render
from rdlm.data.tasks import Example, example_at, make_task, shortcut_accuracy, split_of
from rdlm.data.tokenizer import (CharTokenizer, HFTokenizer, MissingTokenError, Tokenizer,
                                 load_tokenizer)

_PIPELINE = ("examples_per_row", "make_dataset", "make_eval_batches", "make_train_iterator",
             "steps_per_epoch")


def __getattr__(name: str) -> Any:
    if name in _PIPELINE:
        return getattr(importlib.import_module("rdlm.data.pipeline"), name)
    raise AttributeError(f"module 'rdlm.data' has no attribute {name!r}")


__all__ = [
    "CharTokenizer", "Example", "HFTokenizer", "MissingTokenError", "Tokenizer", "example_at",
    "load_tokenizer", "make_task", "parse_answer", "prompt_tokens", "render", "shortcut_accuracy",
    "split_of", *_PIPELINE,
]
