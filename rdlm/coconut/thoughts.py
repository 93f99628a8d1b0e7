"""Continuous thought ("Coconut", SPEC §2): latent reasoning by feeding hidden states back in.

    <bos> question \\n <bot> <latent>×(k·c) <eot> remaining steps … # answer <eos>

At every ``<latent>`` position the input embedding is replaced by the model's **last hidden state
at the previous position**. For a recurrent-depth model that hidden state is defined as

    h_t = ln_f(coda_blocks(ln_f(s_r)))_t          (what the tied head multiplies by wte^T)

i.e. the coda's output after the final norm, exactly the vector whose dot products with the
embedding rows are the logits. It enters *in place of* ``wte[token] · sqrt(d)`` — it bypasses the
embedding table and the ``sqrt(d)`` scale, as the Coconut reference feeds the hidden state
directly as ``inputs_embeds`` — and then goes through the prelude like any token embedding, so for
a recurrent-depth backbone every core step re-injects the thought through ``e``.

How the thoughts are computed (`continuous_forward`): the latents of a row form runs
(``<latent>`` after ``<latent>``); a latent's *ordinal* is its index in its run. Pass p runs the
whole model over the whole sequence and writes ``h_{t-1}`` into every latent position of ordinal
p, in every row and every packed segment at once; after the last pass one more pass gives the
logits. The passes are a fixed-length `lax.scan` (static ``max_latents``) whose surplus passes are
skipped by `lax.cond`, each pass under `jax.checkpoint`; gradients flow through every thought.

Why the full sequence is recomputed every pass instead of reusing a KV cache: causal attention
makes the recomputed prefix exactly what a cache would hold (same inputs, same RoPE positions,
and for a recurrent-depth model the same noise s_0 and the same sampled r in every pass), so the
numbers are identical; recomputing costs (max_latents + 1) full passes instead of ~1, but needs no
per-row cache offsets when rows' latent blocks start at different positions (questions of
different lengths, packed rows) and no cache of r × n_core layers of keys per recurrence step,
and it differentiates like the ordinary forward. On the short sequences of the reasoning tasks the
recomputation is cheap; the test `test_coconut.py` checks the result against a step-by-step
reference that feeds one hidden state at a time. (Pass p fills ordinal p of every run at once, so
a row with two runs of latents in one segment gets its second run's thoughts from a pass in which
the first run is not complete yet; the rendered sequences have one run per row and segment.)

Answers are generated without recomputation: `rdlm.coconut.generation` runs the generation engine,
which feeds each thought once, position by position, into the KV cache
(`rdlm.generation.ThoughtConfig`, the same rules as `thought_inputs`).

Baselines: ``pause`` keeps the ``<latent>`` tokens as ordinary (learned) token embeddings — the
same sequence and curriculum with nothing fed back ("pause as thought"); ``cot`` and ``nocot``
render the language chain or nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from rdlm.config import ModelConfig
from rdlm.model import (AttentionContext, attention_context, bind, core_step, initial_state,
                        masked_token_loss, run_blocks)
from rdlm.model import recurrence

Params = Any
Batch = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# The continuous-thought forward pass.


def latent_ordinals(tokens_bt: jax.Array, latent_id: int) -> jax.Array:
    """Index of each ``<latent>`` within its run of consecutive latents; -1 elsewhere."""
    is_latent_bt = tokens_bt == latent_id
    index_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    last_other_bt = lax.cummax(jnp.where(is_latent_bt, -1, index_bt), axis=1)
    return jnp.where(is_latent_bt, index_bt - last_other_bt - 1, -1).astype(jnp.int32)


def thought_inputs(params: Params, tokens_bt: jax.Array, bases_btd: jax.Array, cfg: ModelConfig,
                   ctx: AttentionContext, is_thought_bt: jax.Array, shift_sees_thoughts: bool,
                   token_inputs_btd: jax.Array | None = None) -> jax.Array:
    """The prelude's input of every position, given its *base*: ``wte[token] · sqrt(d)``, or at a
    thought the previous position's hidden state.

    Without ``model.token_shift`` the input is the base. With it, ordinary tokens add their
    predecessors' shifted embeddings, and a thought is its base alone; ``shift_sees_thoughts``
    instead gives every position (thoughts included) its predecessors' *bases*, so a thought
    reaches the positions after it through the shift as a token would, instead of as the
    ``<latent>`` id. ``token_inputs_btd``: the ordinary tokens' inputs when already computed
    (they do not depend on the thoughts then).
    """
    model = bind(params, cfg)
    if shift_sees_thoughts:
        return model.shifted_inputs(bases_btd, ctx)
    if token_inputs_btd is None:
        token_inputs_btd = model.input_embeddings(tokens_bt, ctx)
    return jnp.where(is_thought_bt[..., None], bases_btd, token_inputs_btd.astype(bases_btd.dtype))


@dataclasses.dataclass(frozen=True)
class Depth:
    """How many recurrence steps a pass runs: ``n_no_grad`` without gradient, then ``n_grad``
    (≤ ``max_grad``, a static scan length) with gradient. Inference: (r, 0, 0)."""

    n_no_grad: Any
    n_grad: Any
    max_grad: int


jax.tree_util.register_dataclass(Depth, data_fields=["n_no_grad", "n_grad"],
                                 meta_fields=["max_grad"])


def hidden_states(params: Params, x_btd: jax.Array, cfg: ModelConfig, ctx: AttentionContext,
                  state0_btd: jax.Array, depth: Depth) -> jax.Array:
    """Input embeddings → the last hidden state ``ln_f(coda(ln_f(s_r)))`` (pre-head)."""
    model = bind(params, cfg)
    embedded_btd, _ = run_blocks(model.prelude, x_btd, ctx)

    def step(consts: tuple, s: jax.Array) -> jax.Array:
        core_params, e_btd, c = consts
        return core_step({"core": core_params}, s, e_btd, cfg, c)

    consts = (params["core"], embedded_btd, ctx)
    state_btd = recurrence.iterate_no_grad(step, consts, state0_btd, depth.n_no_grad)
    if depth.max_grad:
        state_btd = recurrence.iterate_with_grad(step, consts, state_btd, depth.n_grad,
                                                 depth.max_grad, remat=cfg.remat)
    x_btd, _ = run_blocks(model.coda, model.coda_input(state_btd), ctx)
    return model.ln_f(x_btd)


def head_logits(params: Params, hidden_btd: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The output head's float32 logits (`RecurrentDepthLM.head`)."""
    return bind(params, cfg).head(hidden_btd)


def fill_thought_bases(params: Params, tokens_bt: jax.Array, cfg: ModelConfig,
                       ctx: AttentionContext, state0_btd: jax.Array, depth: Depth, *,
                       latent_id: int, max_latents: int, shift_sees_thoughts: bool = False
                       ) -> jax.Array:
    """Every position's base (see `thought_inputs`) with each ``<latent>``'s replaced by the
    previous position's hidden state.

    One pass per latent ordinal (a `lax.scan` of ``max_latents`` passes, the unneeded ones
    skipped); pass p fills ordinal p of every run in the batch at once, so rows whose latent
    blocks start at different positions need no alignment.
    """
    bases_btd = bind(params, cfg).token_bases(tokens_bt)
    if max_latents == 0:
        return bases_btd
    ordinal_bt = latent_ordinals(tokens_bt, latent_id)
    passes_needed = jnp.max(ordinal_bt) + 1
    # Without shift_sees_thoughts the ordinary tokens' inputs are the same in every pass.
    token_inputs_btd = (None if shift_sees_thoughts
                        else bind(params, cfg).input_embeddings(tokens_bt, ctx))

    @jax.checkpoint
    def one_pass(bases_btd: jax.Array, p: jax.Array) -> jax.Array:
        x_btd = thought_inputs(params, tokens_bt, bases_btd, cfg, ctx, ordinal_bt >= 0,
                               shift_sees_thoughts, token_inputs_btd)
        h_btd = hidden_states(params, x_btd, cfg, ctx, state0_btd, depth)
        previous_btd = jnp.pad(h_btd, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        return jnp.where((ordinal_bt == p)[..., None], previous_btd.astype(bases_btd.dtype),
                         bases_btd)

    def body(bases_btd: jax.Array, p: jax.Array) -> tuple[jax.Array, None]:
        return lax.cond(p < passes_needed, one_pass, lambda x, _: x, bases_btd, p), None

    bases_btd, _ = lax.scan(body, bases_btd, jnp.arange(max_latents))
    return bases_btd


def fill_thoughts(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, ctx: AttentionContext,
                  state0_btd: jax.Array, depth: Depth, *, latent_id: int, max_latents: int,
                  shift_sees_thoughts: bool = False) -> jax.Array:
    """The prelude's inputs with every ``<latent>`` a continuous thought (`fill_thought_bases`,
    then `thought_inputs`); ``max_latents=0`` leaves ``<latent>`` an ordinary token (pause)."""
    bases_btd = fill_thought_bases(params, tokens_bt, cfg, ctx, state0_btd, depth,
                                   latent_id=latent_id, max_latents=max_latents,
                                   shift_sees_thoughts=shift_sees_thoughts)
    is_thought_bt = (tokens_bt == latent_id) & (max_latents > 0)
    return thought_inputs(params, tokens_bt, bases_btd, cfg, ctx, is_thought_bt,
                          shift_sees_thoughts)


@functools.partial(jax.jit, static_argnames=("cfg", "latent_id", "max_latents", "substitute",
                                             "shift_sees_thoughts"))
def continuous_forward(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, *,
                       latent_id: int, max_latents: int, depth: Depth,
                       key: jax.Array | None = None, init_scale: float | jax.Array = 0.0,
                       segment_ids: jax.Array | None = None, substitute: bool = True,
                       shift_sees_thoughts: bool = False) -> tuple[jax.Array, jax.Array]:
    """(logits [b, t, vocab] float32, last hidden states [b, t, d]) with continuous thoughts.

    ``substitute=False`` runs the same sequence with ``<latent>`` as an ordinary token (the
    pause-as-thought baseline). One s_0 (from ``key``) serves every pass, so each pass recomputes
    exactly the prefix the previous one computed.
    """
    b, t = tokens_bt.shape
    ctx = attention_context(cfg, b, t, segment_ids=segment_ids)
    state0_btd = initial_state(cfg, (b, t, cfg.d_model), key=key, init_scale=init_scale)
    x_btd = fill_thoughts(params, tokens_bt, cfg, ctx, state0_btd, depth, latent_id=latent_id,
                          max_latents=max_latents if substitute else 0,
                          shift_sees_thoughts=shift_sees_thoughts)
    hidden_btd = hidden_states(params, x_btd, cfg, ctx, state0_btd, depth)
    return head_logits(params, hidden_btd, cfg), hidden_btd


def coconut_loss(params: Params, batch: Batch, cfg: ModelConfig, *, latent_id: int,
                 max_latents: int, depth: Depth, key: jax.Array | None,
                 init_scale: float | jax.Array, substitute: bool = True,
                 shift_sees_thoughts: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean masked next-token cross-entropy of a rendered batch (``inputs``, ``targets``,
    ``loss_mask``, optional ``segment_ids``); the mask from `rdlm.data.render` already covers
    only the remaining steps and the answer."""
    logits_btv, _ = continuous_forward(params, batch["inputs"], cfg, latent_id=latent_id,
                                       max_latents=max_latents, depth=depth, key=key,
                                       init_scale=init_scale,
                                       segment_ids=batch.get("segment_ids"), substitute=substitute,
                                       shift_sees_thoughts=shift_sees_thoughts)
    return masked_token_loss(logits_btv, batch["targets"], batch["loss_mask"])
