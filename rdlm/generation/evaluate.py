"""Exact-match accuracy of a checkpoint on a reasoning task, for several numbers of steps r.

    python -m rdlm eval --checkpoint runs/demo --task chains --num-steps 1,2,4,8,16,32,64

Answers are decoded greedily in batches by the generation engine (`rdlm.generate`: a prefill,
then one cached step per token), with ``num_steps`` traced and one cache slot per step of the
largest r, so that one compilation serves every batch and every r. The initial state is zero by
default (``init_scale=0``), which makes the numbers deterministic; a positive ``init_scale``
draws every position's s_0 from ``seed``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from rdlm.config import Config, ConfigError, ModelConfig
from rdlm.data.render import completion_text, parse_answer, prompt_tokens
from rdlm.data.tasks import (CHAIN_SHORTCUTS, PRONTOQA_SHORTCUTS, PROSQA_SHORTCUTS, Example, Task,
                             example_at, make_task, shortcut_accuracy)
from rdlm.data.tokenizer import Tokenizer, load_tokenizer
from rdlm.generation.api import generate

Params = Any
# Answer heuristics that skip the reasoning, reported beside a model's accuracy.
SHORTCUTS = {"chains": CHAIN_SHORTCUTS, "prosqa": PROSQA_SHORTCUTS, "prontoqa": PRONTOQA_SHORTCUTS}


# ---------------------------------------------------------------------------------------------
# Greedy decoding.


def greedy_answers(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *,
                   num_steps: int, max_new_tokens: int, eos_id: int | None,
                   prompt_len: int | None = None, cache_budget: int | None = None,
                   init_scale: float = 0.0, key: jax.Array | None = None,
                   batch_size: int | None = None, mesh: jax.sharding.Mesh | None = None
                   ) -> list[list[int]]:
    """Each prompt's greedy continuation up to (not including) ``eos_id`` (None: never stops),
    from the generation engine (`rdlm.generate`). Fixing ``prompt_len`` and a ``cache_budget``
    >= every r compiles once for every batch and r (``num_steps`` is data in the program).

    ``batch_size``: decode every prompt with depth-continuous batching on that many rows (a row
    whose answer ends takes the next prompt; `rdlm.generation.continuous`) instead of one batch
    of all of them. ``mesh``: over its devices, as `rdlm.generate` takes it."""
    out = generate(params, cfg, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                   num_steps=num_steps, cache_budget=cache_budget,
                   stop_tokens=() if eos_id is None else (eos_id,),
                   prompt_len=prompt_len, init_scale=init_scale, key=key,
                   continuous_batching=batch_size is not None, batch_size=batch_size,
                   mesh=mesh)
    return [row[:-1] if eos_id is not None and row and row[-1] == eos_id else row
            for row in out.rows()]


def _decode_batches(params: Params, cfg: ModelConfig, prompts: list[list[int]], *,
                    rs: list[int], batch_size: int, **options: Any):
    """(r, answers) for consecutive batches of the prompts, each at every r (the last batch
    padded with copies of its first prompt, so that every batch has one shape)."""
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo:lo + batch_size]
        rows = len(chunk) if len(prompts) <= batch_size else batch_size
        batch = chunk + [chunk[0]] * (rows - len(chunk))
        for r in rs:
            yield r, greedy_answers(params, cfg, batch, num_steps=r, **options)[:len(chunk)]


def _decode_continuous(params: Params, cfg: ModelConfig, prompts: list[list[int]], *,
                       rs: list[int], batch_size: int, **options: Any):
    """(r, answers) for every prompt at once at each r, ``batch_size`` rows working through
    them (depth-continuous batching)."""
    for r in rs:
        yield r, greedy_answers(params, cfg, prompts, num_steps=r, batch_size=batch_size,
                                **options)


# ---------------------------------------------------------------------------------------------
# Accuracy.


def evaluate_accuracy(params: Params, cfg: Config, task: Task | str | None = None, *,
                      num_steps_list: Sequence[int], examples: Sequence[Example] | None = None,
                      num_examples: int = 256, split: str = "test", fmt: str | None = None,
                      batch_size: int = 64, max_new_tokens: int | None = None,
                      init_scale: float = 0.0, seed: int = 0,
                      tokenizer: Tokenizer | None = None,
                      continuous_batching: bool = False,
                      mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Exact-match accuracy for each r in ``num_steps_list``.

    ``task``: a `Task`, a task name (difficulty and knobs from ``cfg.data``), or None for
    ``cfg.data.task``; ``examples`` overrides the generated held-out problems. ``fmt``: ``nocot``
    (default: ``cfg.data.format``) or ``cot`` — the answer is read after the answer mark either
    way. ``init_scale > 0`` draws random initial states from ``seed``. ``continuous_batching``:
    ``batch_size`` rows work through every problem in one call per r, a row taking the next
    problem as soon as its answer ends (`rdlm.generation.continuous`); worth it when answers
    differ in length (chains of thought). On short answers of one length it decodes as fast
    as lockstep batches and compiles longer (docs/data.md). ``mesh``: decode over its devices
    (`rdlm.generate`'s ``mesh``: the batch, or the queue's groups, over "data", the weights
    over "tensor").

    Returns ``{"accuracy": {r: float}, "predictions": {r: [str]}, "answers": [str],
    "num_examples", "task", "split", "format", "seconds", "shortcuts"}`` (accuracies of answer
    heuristics that skip the reasoning, for chains / prosqa / prontoqa).
    """
    fmt = fmt or cfg.data.format
    if fmt not in ("nocot", "cot"):
        raise ConfigError(f"format={fmt!r}: greedy evaluation supports 'nocot' and 'cot'; "
                          "continuous-thought models are evaluated by rdlm's coconut module.")
    if isinstance(task, str) or task is None:
        task = make_task(task or cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
    if examples is None:
        examples = [example_at(task, split, i) for i in range(num_examples)]
    if not examples:
        raise ValueError("no examples to evaluate.")
    tok = tokenizer or load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the {cfg.data.tokenizer!r} tokenizer has {tok.vocab_size} tokens but "
                          f"model.vocab_size={cfg.model.vocab_size}.")
    prompts = [prompt_tokens(e, tok, fmt=fmt) for e in examples]
    if max_new_tokens is None:
        # Exact match needs the reference completion and its EOS; CoT gets slack for longer steps.
        longest = max(len(tok.encode(completion_text(e, fmt=fmt))) for e in examples) + 1
        max_new_tokens = longest if fmt == "nocot" else longest + 8
    width = max(len(p) for p in prompts) + max_new_tokens
    if width > cfg.model.max_seq_len:
        raise ConfigError(f"prompts plus {max_new_tokens} new tokens need {width} positions but "
                          f"model.max_seq_len={cfg.model.max_seq_len}; lower the difficulty.")
    key = jax.random.key(seed) if init_scale else None

    start = time.perf_counter()
    predictions: dict[int, list[str]] = {int(r): [] for r in num_steps_list}
    # One prompt length, one batch shape and one cache slot per step of the largest r: a single
    # compilation serves every batch and every r.
    prompt_len, budget = max(len(p) for p in prompts), max(predictions)
    decode = _decode_continuous if continuous_batching else _decode_batches
    for r, answers in decode(params, cfg.model, prompts, rs=list(predictions),
                             batch_size=batch_size, max_new_tokens=max_new_tokens,
                             eos_id=tok.eos_id, prompt_len=prompt_len, cache_budget=budget,
                             init_scale=init_scale, key=key, mesh=mesh):
        predictions[r] += [parse_answer(tok.decode(a)) for a in answers]
    answers = [e.answer for e in examples]
    accuracy = {r: float(np.mean([p == a for p, a in zip(preds, answers)]))
                for r, preds in predictions.items()}
    by_depth = accuracy_by_reasoning_steps(examples, predictions)
    result = {"task": getattr(task, "name", str(task)), "params": str(getattr(task, "params", "")),
              "split": split, "format": fmt, "num_examples": len(examples),
              "init_scale": init_scale, "accuracy": accuracy,
              "accuracy_by_reasoning_steps": by_depth, "predictions": predictions,
              "answers": answers, "seconds": time.perf_counter() - start}
    heuristics = SHORTCUTS.get(getattr(task, "name", None))
    if heuristics:
        result["shortcuts"] = shortcut_accuracy(examples, heuristics)
    return result


def accuracy_by_reasoning_steps(examples: Sequence[Example], predictions: dict[int, list[str]]
                                ) -> dict[int, dict[int, float]]:
    """{r: {number of reasoning steps: accuracy}}: how accuracy falls with problem depth (for
    chains, steps = hops + 1), and whether more iterations help the deeper problems."""
    depth = np.array([len(e.steps) for e in examples])
    correct = {r: np.array([p == e.answer for p, e in zip(preds, examples)])
               for r, preds in predictions.items()}
    return {r: {int(d): float(c[depth == d].mean()) for d in np.unique(depth)}
            for r, c in correct.items()}


# ---------------------------------------------------------------------------------------------
# Reporting and the command line.


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of accuracy by r, with the shortcut baselines underneath."""
    by_depth = result.get("accuracy_by_reasoning_steps") or {}
    depths = sorted({d for v in by_depth.values() for d in v})
    depths = depths if len(depths) > 1 else []
    lines = [f"task {result['task']} {result['params']}, split {result['split']}, "
             f"{result['num_examples']} examples, format {result['format']}", "",
             "| r | accuracy |" + "".join(f" {d} steps |" for d in depths),
             "|---:|---:|" + "---:|" * len(depths)]
    lines += [f"| {r} | {acc:.3f} |" + "".join(f" {by_depth[r].get(d, float('nan')):.3f} |"
                                               for d in depths)
              for r, acc in result["accuracy"].items()]
    if result.get("shortcuts"):
        lines += ["", "shortcut heuristics (no reasoning): " + ", ".join(
            f"{k} {v:.3f}" for k, v in result["shortcuts"].items())]
    return "\n".join(lines)


def read_problems(path: str | Path) -> list[Example]:
    """Problems from a JSONL file: ``{"question": str, "answer": str, "steps": [str, ...]}`` per
    line ("steps" optional), e.g. problems generated independently of rdlm's own splits."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--problems {str(path)!r} does not exist.")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append(Example(str(row["question"]), tuple(map(str, row.get("steps", ()))),
                                    str(row["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{str(path)!r} line {number}: expected a JSON object with "
                              f"'question' and 'answer' ({type(err).__name__}: {err}).") from None
    if not examples:
        raise ConfigError(f"--problems {str(path)!r} holds no problems.")
    return examples
