"""Data: grain pipelines, synthetic reasoning tasks, tokenizers and sources (see docs/data.md)."""

from rdlm.data.pipeline import (examples_per_row, make_dataset, make_eval_batches,
                                make_train_iterator, steps_per_epoch)
from rdlm.data.render import parse_answer, prompt_tokens, render
from rdlm.data.tasks import (Example, example_at, make_task, shortcut_accuracy, split_of)
from rdlm.data.tokenizer import CharTokenizer, load_tokenizer

__all__ = [
    "CharTokenizer", "Example", "example_at", "examples_per_row", "load_tokenizer", "make_dataset",
    "make_eval_batches", "make_task", "make_train_iterator", "parse_answer", "prompt_tokens",
    "render", "shortcut_accuracy", "split_of", "steps_per_epoch",
]
