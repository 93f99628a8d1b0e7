"""Exact-match accuracy of a checkpoint on a reasoning task, for several numbers of steps r.

    python -m rdlm eval --checkpoint runs/demo --task chains --num-steps 1,2,4,8,16,32,64

Answers are decoded greedily in batches: prompts are right-padded into one buffer and every new
token is one full causal forward pass (answers are a few tokens, so a KV cache buys little here),
with ``num_steps`` traced so that one compilation serves every r. The initial state is zero by
default (``init_scale=0``), which makes the numbers deterministic.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.config import Config, ConfigError, ModelConfig
from rdlm.data.render import completion_text, parse_answer, prompt_tokens
from rdlm.data.tasks import (CHAIN_SHORTCUTS, PRONTOQA_SHORTCUTS, PROSQA_SHORTCUTS, Example, Task,
                             example_at, make_task, shortcut_accuracy)
from rdlm.data.tokenizer import Tokenizer, load_tokenizer
from rdlm.model import forward

Params = Any
# Answer heuristics that skip the reasoning, reported beside a model's accuracy.
SHORTCUTS = {"chains": CHAIN_SHORTCUTS, "prosqa": PROSQA_SHORTCUTS, "prontoqa": PRONTOQA_SHORTCUTS}


# ---------------------------------------------------------------------------------------------
# Greedy decoding.


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id", "pad_id"))
def greedy_decode(params: Params, tokens_bl: jax.Array, lengths_b: jax.Array, num_steps: jax.Array,
                  *, cfg: ModelConfig, max_new_tokens: int, eos_id: int, pad_id: int,
                  key: jax.Array | None = None, init_scale: float | jax.Array = 0.0
                  ) -> tuple[jax.Array, jax.Array]:
    """Append up to ``max_new_tokens`` greedy tokens after each row's prompt.

    ``tokens_bl``: prompts right-padded to a buffer long enough for the answer; ``lengths_b``:
    prompt lengths. Causal attention means the padding after a row's end never influences it.
    Returns (buffer, lengths after generation); a row stops after its EOS.
    """
    b = tokens_bl.shape[0]
    rows_b = jnp.arange(b)

    def body(i, carry):
        tokens_bl, lengths_b, done_b = carry
        step_key = None if key is None else jax.random.fold_in(key, i)
        logits_blv, _ = forward(params, tokens_bl, cfg, num_steps=num_steps, key=step_key,
                                init_scale=init_scale if key is not None else 0.0)
        next_b = jnp.argmax(logits_blv[rows_b, lengths_b - 1], axis=-1).astype(tokens_bl.dtype)
        next_b = jnp.where(done_b, pad_id, next_b)
        tokens_bl = tokens_bl.at[rows_b, lengths_b].set(
            jnp.where(done_b, tokens_bl[rows_b, lengths_b], next_b))
        lengths_b = lengths_b + (~done_b)
        return tokens_bl, lengths_b, done_b | (next_b == eos_id)

    done_b = jnp.zeros((b,), bool)
    tokens_bl, lengths_b, _ = jax.lax.fori_loop(0, max_new_tokens, body,
                                                (tokens_bl, lengths_b, done_b))
    return tokens_bl, lengths_b


def _decode_answers(tokens_bl: np.ndarray, starts_b: np.ndarray, ends_b: np.ndarray,
                    tok: Tokenizer) -> list[str]:
    texts = []
    for row, start, end in zip(tokens_bl, starts_b, ends_b):
        generated = [int(t) for t in row[start:end]]
        if tok.eos_id in generated:
            generated = generated[:generated.index(tok.eos_id)]
        texts.append(tok.decode(generated))
    return texts


# ---------------------------------------------------------------------------------------------
# Accuracy.


def evaluate_accuracy(params: Params, cfg: Config, task: Task | str | None = None, *,
                      num_steps_list: Sequence[int], examples: Sequence[Example] | None = None,
                      num_examples: int = 256, split: str = "test", fmt: str | None = None,
                      batch_size: int = 64, max_new_tokens: int | None = None,
                      init_scale: float = 0.0, seed: int = 0,
                      tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """Exact-match accuracy for each r in ``num_steps_list``.

    ``task``: a `Task`, a task name (difficulty and knobs from ``cfg.data``), or None for
    ``cfg.data.task``; ``examples`` overrides the generated held-out problems. ``fmt``: ``nocot``
    (default: ``cfg.data.format``) or ``cot`` — the answer is read after the answer mark either
    way. ``init_scale > 0`` draws random initial states from ``seed``.

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
    for lo in range(0, len(examples), batch_size):
        chunk = prompts[lo:lo + batch_size]
        rows = len(chunk) if len(prompts) <= batch_size else batch_size  # one shape: one compile
        tokens = np.full((rows, width), tok.pad_id, np.int32)
        lengths = np.ones(rows, np.int32)
        for i, p in enumerate(chunk):
            tokens[i, :len(p)], lengths[i] = p, len(p)
        for r in predictions:
            out, ends = greedy_decode(params, jnp.asarray(tokens), jnp.asarray(lengths),
                                      jnp.asarray(r, jnp.int32), cfg=cfg.model,
                                      max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                                      pad_id=tok.pad_id, key=key, init_scale=init_scale)
            texts = _decode_answers(np.asarray(out), lengths, np.asarray(ends), tok)
            predictions[r] += [parse_answer(t) for t in texts[:len(chunk)]]
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
