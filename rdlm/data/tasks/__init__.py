"""Synthetic reasoning tasks: deterministic generators (index → example) with difficulty knobs.

Every task produces `Example(question, steps, answer)`: ``steps`` is the reasoning chain in
language, so the same example renders as No-CoT ("question → answer"), CoT ("question → steps →
answer") or continuous thought (the first k steps replaced by latents), see `rdlm.data.render`.

Held-out splits cannot overlap training: a problem's split is a hash of its question text
(`split_of`), fixed for all seeds and knobs, and a split's generator rejects every problem whose hash
falls elsewhere. The same question can therefore never appear in two splits.

Tasks (``difficulty`` 1 = learnable by a small CPU model … 5 = the papers' setting), one module each:
- ``chains``:   multi-hop variable chains ``a=7;d=3;b=a;e=d;?b`` → ``7``, with distractor chains;
- ``addition``: multi-digit addition ``123+45`` → ``168`` (optionally reversed digits);
- ``prosqa``:   ProsQA-style DAG reachability "is tom a A or B?" (SPEC §2);
- ``prontoqa``: ProntoQA-style k-hop logic over fictional ontologies, true/false.
`load_gsm8k_aug` (``gsm8k``) reads user-supplied GSM8k-Aug files into the same `Example` form;
`make_task` (``registry``) builds a task at a difficulty level with knob overrides.
"""

from rdlm.data.tasks.addition import AdditionParams, AdditionTask
from rdlm.data.tasks.base import (MAX_ATTEMPTS, SPLITS, Example, Task, check_split, example_at,
                                  seeded_rng, split_of)
from rdlm.data.tasks.chains import (CHAIN_NOTATIONS, CHAIN_ORDERS, CHAIN_SHORTCUTS,
                                    SIBLING_QUESTIONS, ChainsParams, ChainsTask, chains_questions,
                                    parse_statement, shortcut_accuracy, solve_chains)
from rdlm.data.tasks.gsm8k import load_gsm8k_aug, parse_gsm8k_aug_line
from rdlm.data.tasks.prontoqa import PRONTOQA_SHORTCUTS, ProntoQAParams, ProntoQATask
from rdlm.data.tasks.prosqa import (PROSQA_NOTATIONS, PROSQA_SHORTCUTS, SYMBOL_NODES, ProsQAGraph,
                                   ProsQAParams, ProsQATask, parse_prosqa, prosqa_distances,
                                   prosqa_options, solve_prosqa)
from rdlm.data.tasks.registry import DIFFICULTY, TASKS, make_task
from rdlm.data.tasks.words import CONCEPTS, ENTITIES, PROPERTIES

__all__ = [
    "AdditionParams", "AdditionTask", "CHAIN_NOTATIONS", "CHAIN_ORDERS", "CHAIN_SHORTCUTS",
    "CONCEPTS", "ChainsParams", "ChainsTask", "DIFFICULTY", "ENTITIES", "Example", "MAX_ATTEMPTS",
    "PROPERTIES", "PRONTOQA_SHORTCUTS", "PROSQA_NOTATIONS", "PROSQA_SHORTCUTS", "ProntoQAParams",
    "ProntoQATask", "ProsQAGraph", "ProsQAParams", "ProsQATask", "SIBLING_QUESTIONS", "SPLITS",
    "SYMBOL_NODES", "TASKS", "Task", "chains_questions", "check_split", "example_at",
    "load_gsm8k_aug", "make_task", "parse_gsm8k_aug_line", "parse_prosqa", "parse_statement",
    "prosqa_distances", "prosqa_options", "seeded_rng", "shortcut_accuracy", "solve_chains",
    "solve_prosqa", "split_of",
]
