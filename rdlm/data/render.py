"""Examples → token sequences with loss masks (No-CoT, CoT, continuous thought).

Layout (``|`` separates the prompt from the completion)::

    nocot:    <bos> question \\n | # answer <eos>
    cot:      <bos> question \\n | step \\n step \\n … # answer <eos>
    coconut:  <bos> question \\n <bot> <latent>×(k·c) <eot> | remaining steps … # answer <eos>

The mask marks the tokens whose prediction counts: the completion (``loss_on="completion"``) or
everything after <bos> (``loss_on="all"``). Latent positions never count: their input is replaced by
a hidden state, and no token is predicted there (SPEC §2: loss only on remaining steps and answer).
"""

from __future__ import annotations

import numpy as np

from rdlm.errors import ConfigError
from rdlm.data.tasks import Example
from rdlm.data.tokenizer import Tokenizer

FORMATS = ("nocot", "cot", "coconut")
LOSS_ON = ("completion", "all")
ANSWER_MARK = "#"


def prompt_tokens(example: Example, tok: Tokenizer, *, fmt: str = "nocot",
                  num_latent_steps: int = 0, latents_per_step: int = 1) -> list[int]:
    """What a model is given at test time; it must generate the rest."""
    ids = [tok.require("bos", "rendering examples")] + tok.encode(example.question + "\n")
    if fmt == "coconut":
        ids += _latent_block(example, tok, num_latent_steps, latents_per_step)
    return ids


def completion_text(example: Example, *, fmt: str = "nocot", num_latent_steps: int = 0) -> str:
    """The language part a model must produce after the prompt (before <eos>)."""
    steps = () if fmt == "nocot" else example.steps[num_latent_steps if fmt == "coconut" else 0:]
    return "".join(s + "\n" for s in steps) + ANSWER_MARK + example.answer


def render(example: Example, tok: Tokenizer, *, fmt: str = "nocot", loss_on: str = "completion",
           num_latent_steps: int = 0, latents_per_step: int = 1
           ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask) int32 of equal length; mask[t] = 1 where predicting tokens[t] counts.

    For ``coconut``, ``num_latent_steps`` (k) of the steps are replaced by k·``latents_per_step``
    latents; k larger than the number of steps drops all language steps (the final stage), still
    with k·c latents (the Coconut reference does the same).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r} is invalid: must be one of {FORMATS}.")
    if loss_on not in LOSS_ON:
        raise ConfigError(f"data.loss_on={loss_on!r} is invalid: must be one of {LOSS_ON}.")
    prompt = prompt_tokens(example, tok, fmt=fmt, num_latent_steps=num_latent_steps,
                           latents_per_step=latents_per_step)
    completion = tok.encode(completion_text(example, fmt=fmt, num_latent_steps=num_latent_steps))
    completion.append(tok.require("eos", "rendering examples"))
    tokens = np.asarray(prompt + completion, np.int32)
    mask = np.zeros(len(tokens), np.int32)
    if loss_on == "all":
        mask[1:] = 1
        if fmt == "coconut":  # latent block: <bot> stays (it is a real token), latents and <eot> not
            mask[(tokens == tok.latent_id) | (tokens == tok.eot_id)] = 0
    else:
        mask[len(prompt):] = 1
    return tokens, mask


def render_branches(questions: list[tuple[str, str]], tok: Tokenizer, *,
                    loss_on: str = "completion") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several No-CoT questions about one context as one shared trunk and isolated branches.

    The trunk is the questions' common prefix (the context); branch k holds the rest of question
    k and its completion. With ``branch_ids`` the model lets each branch see only the trunk and
    itself, at the positions it would have alone, so every branch is exactly the single-question
    example — one forward pass trains all questions of a context (dense supervision for recall
    tasks) without any answer leaking into another question. Returns (tokens, mask, branch_ids).
    """
    if not questions:
        raise ValueError("render_branches needs at least one question.")
    texts = [q for q, _ in questions]
    trunk = texts[0][:len(_common_prefix(texts))]
    tokens = [tok.require("bos", "data.branches")] + tok.encode(trunk)
    mask = [0] + [int(loss_on == "all")] * (len(tokens) - 1)
    branch = [0] * len(tokens)
    for k, (question, answer) in enumerate(questions, start=1):
        example = Example(question, (), answer)
        prompt = tok.encode(question[len(trunk):] + "\n")
        completion = tok.encode(completion_text(example)) + [tok.require("eos", "data.branches")]
        if tok.encode(question + "\n") != tok.encode(trunk) + prompt:
            raise ConfigError("data.branches needs a tokenizer that encodes the context and the "
                              "question separately exactly as together (e.g. 'chars').")
        # A branch's first token is never a target: in the flat row it follows another branch.
        mask += [0] + [int(loss_on == "all")] * (len(prompt) - 1) + [1] * len(completion)
        tokens += prompt + completion
        branch += [k] * (len(prompt) + len(completion))
    return (np.asarray(tokens, np.int32), np.asarray(mask, np.int32),
            np.asarray(branch, np.int32))


def _common_prefix(texts: list[str]) -> str:
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def _latent_block(example: Example, tok: Tokenizer, k: int, c: int) -> list[int]:
    bot, latent, eot = (tok.require(role, "data.format='coconut'")
                        for role in ("bot", "latent", "eot"))
    if k < 0 or c < 1:
        raise ConfigError(f"latent steps k={k}, latents per step c={c}: need k >= 0 and c >= 1.")
    n = k * c  # as in the Coconut reference: k·c latents even when fewer steps remain
    return [bot] + [latent] * n + [eot]


def parse_answer(text: str) -> str:
    """The answer in generated text: after the last answer mark, up to the end of the line."""
    if ANSWER_MARK not in text:
        return ""
    return text.rsplit(ANSWER_MARK, 1)[1].split("\n", 1)[0].strip()
