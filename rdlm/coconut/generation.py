"""Answers of a continuous-thought model: greedy decoding after the thoughts, and accuracy."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rdlm.coconut.curriculum import CoconutConfig, eval_depth, eval_prompt
from rdlm.coconut.thoughts import (Depth, Params, fill_thought_bases, head_logits, hidden_states,
                                   thought_inputs)
from rdlm.config import Config, ModelConfig
from rdlm.data.render import parse_answer
from rdlm.data.tasks import Example, example_at, make_task
from rdlm.data.tokenizer import load_tokenizer
from rdlm.model import attention_context, bind


# ---------------------------------------------------------------------------------------------
# Evaluation: greedy decoding after the continuous thoughts.


@functools.partial(jax.jit, static_argnames=("cfg", "latent_id", "max_latents", "max_new_tokens",
                                             "eos_id", "substitute", "max_grad",
                                             "shift_sees_thoughts"))
def generate_after_thoughts(params: Params, tokens_bl: jax.Array, lengths_b: jax.Array,
                            n_steps: jax.Array, *, cfg: ModelConfig, latent_id: int,
                            max_latents: int, max_new_tokens: int, eos_id: int,
                            substitute: bool = True, max_grad: int = 0,
                            shift_sees_thoughts: bool = False
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy decoding: the prompt's latents become continuous thoughts (computed once, they
    never change), then each new token is one full causal pass over the buffer.

    Returns (buffer, lengths after generation, generated language tokens per row incl. EOS).
    """
    b, l = tokens_bl.shape
    ctx = attention_context(cfg, b, l)
    depth = Depth(n_steps, jnp.int32(0), max_grad)
    state0 = jnp.zeros((b, l, cfg.d_model), jnp.dtype(cfg.dtype))
    bases_bld = fill_thought_bases(params, tokens_bl, cfg, ctx, state0, depth,
                                   latent_id=latent_id, max_latents=max_latents if substitute else 0,
                                   shift_sees_thoughts=shift_sees_thoughts)
    rows_b = jnp.arange(b)
    is_thought_bl = (tokens_bl == latent_id) if substitute else jnp.zeros((b, l), bool)
    inputs = lambda tokens_bl, bases_bld: thought_inputs(params, tokens_bl, bases_bld, cfg, ctx,
                                                         is_thought_bl, shift_sees_thoughts)

    def body(carry):
        i, tokens_bl, bases_bld, lengths_b, done_b, count_b = carry
        h_bld = hidden_states(params, inputs(tokens_bl, bases_bld), cfg, ctx, state0, depth)
        last_bd = h_bld[rows_b, lengths_b - 1]
        next_b = jnp.argmax(head_logits(params, last_bd[:, None], cfg)[:, 0], -1).astype(jnp.int32)
        write_b = ~done_b & (lengths_b < l)
        pos_b = jnp.minimum(lengths_b, l - 1)
        tokens_bl = tokens_bl.at[rows_b, pos_b].set(
            jnp.where(write_b, next_b, tokens_bl[rows_b, pos_b]))
        # The new token's base; the thoughts stay as they were computed (the next pass's
        # `inputs` gives the new token's successors their shift).
        bases_bld = jnp.where(is_thought_bl[..., None], bases_bld,
                              bind(params, cfg).token_bases(tokens_bl).astype(bases_bld.dtype))
        lengths_b = lengths_b + write_b
        count_b = count_b + write_b
        done_b = done_b | (write_b & (next_b == eos_id)) | (lengths_b >= l)
        return i + 1, tokens_bl, bases_bld, lengths_b, done_b, count_b

    # A while loop: a batch stops as soon as every row has ended (CoT answers are long, the
    # others a few tokens).
    keep_going = lambda c: (c[0] < max_new_tokens) & ~jnp.all(c[4])
    zeros = jnp.zeros((b,), jnp.int32)
    carry = (jnp.int32(0), tokens_bl, bases_bld, lengths_b, jnp.zeros((b,), bool), zeros)
    _, tokens_bl, _, lengths_b, _, count_b = lax.while_loop(keep_going, body, carry)
    return tokens_bl, lengths_b, count_b


def evaluate_method(params: Params, cfg: Config, cc: CoconutConfig,
                    examples: Sequence[Example] | None = None, batch_size: int = 64
                    ) -> dict[str, Any]:
    """Accuracy and mean generated tokens (language tokens incl. EOS, plus the k·c thoughts the
    model computes: the paper's count) of greedy answers."""
    tok = load_tokenizer(cfg.data.tokenizer)
    if examples is None:
        task = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
        examples = [example_at(task, cc.eval_split, i, cfg.seed) for i in range(cc.eval_examples)]
    r = int(eval_depth(cfg, cc).n_no_grad)
    batch_size = min(batch_size, len(examples))  # no padding rows beyond the examples
    correct, generated, predictions = 0, 0, []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [eval_prompt(e, tok, cc) for e in chunk]
        width = max(map(len, prompts)) + cc.max_new_tokens
        buf = np.full((batch_size, width), tok.pad_id, np.int32)
        lengths = np.ones(batch_size, np.int32)
        for i, p in enumerate(prompts):
            buf[i, :len(p)] = p
            lengths[i] = len(p)
        out, new_len, count = jax.device_get(generate_after_thoughts(
            params, jnp.asarray(buf), jnp.asarray(lengths), jnp.int32(r), cfg=cfg.model,
            latent_id=tok.latent_id, max_latents=cc.max_latents,
            max_new_tokens=cc.max_new_tokens, eos_id=tok.eos_id,
            substitute=cc.method == "coconut", shift_sees_thoughts=cc.shift_sees_thoughts))
        for i, e in enumerate(chunk):
            text = tok.decode(out[i, lengths[i]:new_len[i]])
            answer = parse_answer(text.replace("<eos>", ""))
            correct += answer == e.answer
            generated += int(count[i]) + cc.max_latents
            predictions.append({"answer": e.answer, "generated": text})
    n = max(len(examples), 1)
    return {"accuracy": correct / n, "generated_tokens": generated / n, "num_examples": len(examples),
            "num_steps": r, "predictions": predictions}


# ---------------------------------------------------------------------------------------------
# Command line: python -m rdlm coconut CONFIG [key=value ...]
