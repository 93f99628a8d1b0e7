"""Coconut answers on the generation engine: thoughts computed once into the KV cache, then
cached decoding, equal to a continuous forward recomputed over the growing sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm.coconut import Depth, generation, thoughts
from rdlm.config import model_preset
from rdlm.data.tokenizer import load_tokenizer
from rdlm.generation import ThoughtConfig
from tests.test_coconut import _params  # fresh params with a non-zero token shift

TOK = load_tokenizer("chars")
LATENT = TOK.latent_id


def _cfg(token_shift: int):
    return model_preset("tiny", mean_recurrence=2, max_seq_len=64, token_shift=token_shift)


def _tokens(question: str, n_latents: int, tail: str = "#") -> list[int]:
    return ([TOK.bos_id] + TOK.encode(question) + [TOK.bot_id] + [LATENT] * n_latents
            + [TOK.eot_id] + TOK.encode(tail))


# Thoughts at different positions per row, a row that starts with a thought (nothing before it:
# its base is zero) and one without any (CoT / No-CoT prompts). One run of thoughts per row: with
# two, the reference's pass p would fill the second run's first thought before the first run is
# complete, while the engine follows the sequence.
PROMPTS = [_tokens("a=1;b=a;?b", 2), _tokens("k=3;?k", 1, "#x"),
           [TOK.bos_id, 9, 12, LATENT, LATENT, LATENT, 7], [LATENT, LATENT, 8],
           [TOK.bos_id] + TOK.encode("q=2;?q")]


def _recomputed_argmax(params, cfg, prompt, new_tokens, width, substitute, sees):
    """The spec: a fresh continuous forward over the growing sequence at every new token (padded
    to one width: attention is causal, so the trailing zeros cannot change earlier logits)."""
    depth = Depth(jnp.int32(2), jnp.int32(0), 0)
    reference = jax.jit(lambda t: thoughts.continuous_forward(
        params, t, cfg, latent_id=LATENT, max_latents=3, depth=depth, substitute=substitute,
        shift_sees_thoughts=sees)[0])
    seq = list(prompt)
    for _ in range(new_tokens):
        logits = reference(jnp.array([seq + [0] * (width - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("token_shift,sees,substitute",
                         [(0, False, True), (2, False, True), (2, True, True), (2, True, False)])
def test_generation_after_thoughts_equals_recomputed_argmax(token_shift, sees, substitute):
    """Coconut (``substitute``) and pause (latents as ordinary tokens), with and without the token
    shift and ``shift_sees_thoughts``, for a batch of prompts of different lengths."""
    cfg = _cfg(token_shift)
    params = _params(cfg, 6)
    new_tokens = 4
    width = max(map(len, PROMPTS)) + new_tokens
    out = generation.generate_after_thoughts(
        params, cfg, PROMPTS, num_steps=2, latent_id=LATENT, max_new_tokens=new_tokens,
        eos_id=None, substitute=substitute, shift_sees_thoughts=sees)
    for i, prompt in enumerate(PROMPTS):
        expected = _recomputed_argmax(params, cfg, prompt, new_tokens, width, substitute, sees)
        # A generated <latent> is an ordinary token, but the reference would make it a thought.
        assert LATENT not in expected
        assert out.rows()[i] == expected


def test_hidden_states_of_the_thoughts_equal_the_continuous_forward():
    """Logits of the first answer token (read after the thought tail) match the continuous
    forward's at the last prompt position, row by row."""
    cfg = _cfg(2)
    params = _params(cfg, 3)
    out = rdlm.generate(params, cfg, PROMPTS, max_new_tokens=1, num_steps=2,
                        thoughts=ThoughtConfig(LATENT, True), return_logits=True)
    depth = Depth(jnp.int32(2), jnp.int32(0), 0)
    for i, prompt in enumerate(PROMPTS):
        logits, _ = thoughts.continuous_forward(params, jnp.array([prompt]), cfg, latent_id=LATENT,
                                                max_latents=3, depth=depth,
                                                shift_sees_thoughts=True)
        np.testing.assert_allclose(out.logits[i, 0], logits[0, -1], atol=3e-4, rtol=1e-4)


def test_rows_end_after_eos_and_prompt_len_only_pads():
    cfg = _cfg(0)
    params = _params(cfg, 6)
    prompts = PROMPTS[:2]
    free = generation.generate_after_thoughts(params, cfg, prompts, num_steps=2, latent_id=LATENT,
                                              max_new_tokens=3, eos_id=None)
    eos = free.rows()[0][1]
    out = generation.generate_after_thoughts(params, cfg, prompts, num_steps=2, latent_id=LATENT,
                                             max_new_tokens=3, eos_id=eos, prompt_len=30)
    assert out.rows()[0] == free.rows()[0][:2]
    for row, whole in zip(out.rows(), free.rows()):
        assert row == (whole[:whole.index(eos) + 1] if eos in whole else whole)


def test_thought_errors():
    cfg = _cfg(0)
    params = _params(cfg, 0)
    with pytest.raises(ValueError, match="thought token id"):
        rdlm.generate(params, cfg, [[1, 2]], max_new_tokens=1, num_steps=1,
                      thoughts=ThoughtConfig(cfg.vocab_size))
    with pytest.raises(ValueError, match="prompt_len"):
        rdlm.generate(params, cfg, [[1, 2, 3]], max_new_tokens=1, num_steps=1, prompt_len=2)


def test_thoughts_with_speculative_decoding_give_the_plain_greedy_tokens():
    """The thoughts only change the prefill: greedy self-speculative decoding after them emits
    exactly what plain decoding does."""
    cfg = _cfg(2)
    params = _params(cfg, 6)
    thoughts_cfg = ThoughtConfig(LATENT, True)
    plain = rdlm.generate(params, cfg, PROMPTS, max_new_tokens=5, num_steps=2,
                          thoughts=thoughts_cfg)
    fast = rdlm.generate(params, cfg, PROMPTS, max_new_tokens=5, num_steps=2,
                         thoughts=thoughts_cfg, speculative=rdlm.SpeculativeConfig(2, 1))
    assert fast.rows() == plain.rows()
