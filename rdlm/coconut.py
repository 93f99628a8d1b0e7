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
reference that feeds one hidden state at a time.

Baselines: ``pause`` keeps the ``<latent>`` tokens as ordinary (learned) token embeddings — the
same sequence and curriculum with nothing fed back ("pause as thought"); ``cot`` and ``nocot``
render the language chain or nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from jax import lax

from rdlm import checkpoint as ckpt_lib
from rdlm import recurrence
from rdlm import sharding as shard_lib
from rdlm.config import Config, ConfigError, DataConfig, ModelConfig, from_dict
from rdlm.data.render import parse_answer, prompt_tokens, render
from rdlm.data.tasks import Example, example_at, make_task
from rdlm.data.tokenizer import Tokenizer, load_tokenizer
from rdlm.model import (AttentionContext, attention_context, bind, core_step, initial_state,
                        run_blocks)
from rdlm.optim import make_optimizer
from rdlm.recurrence import sample_depth

Params = Any
Batch = dict[str, jax.Array]
METHODS = ("coconut", "pause", "cot", "nocot")


# ---------------------------------------------------------------------------------------------
# Configuration of a curriculum run (the `coconut:` section of configs/coconut-*.yaml).


@dataclasses.dataclass(frozen=True)
class CoconutConfig:
    """Method, curriculum and evaluation of a continuous-thought run.

    Stages (``curriculum``): stage 0 is the full chain of thought (``<bot><eot>`` then the steps);
    stage k = 1 … ``max_latent_stage`` replaces the first k steps by k·c latents; the final stage
    ``max_latent_stage + 1`` keeps ``max_latent_stage``·c latents and drops every language step.
    Without a curriculum only the final stage is trained. ``cot`` / ``nocot`` have one stage.
    """

    method: str = "coconut"  # coconut | pause | cot | nocot
    latents_per_step: int = 1  # c
    max_latent_stage: int = 2  # K: stages 0..K, then the final stage K + 1
    curriculum: bool = True  # False: "without curriculum", straight to the final stage
    steps_per_stage: int = 200  # optimizer steps per stage (epochs_per_stage wins when > 0)
    epochs_per_stage: int = 0  # epochs of num_train_examples per stage; 0: use steps_per_stage
    num_train_examples: int = 4000  # the training set: the first N problems of the train split
    uniform_prob: float = 0.0  # a row draws a uniformly random stage with this probability
    # With model.token_shift: the positions after a thought see the thought through the shift
    # (True), or the <latent> token's embedding (False) — docs/coconut.md.
    shift_sees_thoughts: bool = False
    train_num_steps: int = 0  # r while training: 0 = sampled (model.mean_recurrence), else fixed
    init_scale: float = 0.0  # s_0 scale (0: zero state, the deterministic plain-transformer case)
    eval_num_steps: int = 0  # r at evaluation; 0: model.mean_recurrence (or train_num_steps)
    eval_examples: int = 256
    eval_split: str = "test"
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, valid: str) -> None:
            if not ok:
                raise ConfigError(f"coconut.{name}={getattr(self, name)!r} is invalid: {valid}.")
        need(self.method in METHODS, "method", f"must be one of {METHODS}")
        for name in ("latents_per_step", "eval_examples", "max_new_tokens", "num_train_examples"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 "must be a positive integer")
        for name in ("max_latent_stage", "steps_per_stage", "epochs_per_stage", "train_num_steps",
                     "eval_num_steps"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name,
                 "must be an integer >= 0")
        need(0.0 <= self.uniform_prob <= 1.0, "uniform_prob", "must be in [0, 1]")
        need(self.init_scale >= 0.0, "init_scale", "must be >= 0")

    @property
    def uses_latents(self) -> bool:
        return self.method in ("coconut", "pause")

    @property
    def max_latents(self) -> int:
        """Latents in the longest latent block (the final stage's): the number of passes."""
        return self.max_latent_stage * self.latents_per_step if self.uses_latents else 0

    @property
    def final_stage(self) -> int:
        return self.max_latent_stage + 1 if self.uses_latents else 0


def load_coconut_config(path: str | Path | None, overrides: Sequence[str] = ()
                        ) -> tuple[Config, CoconutConfig]:
    """A YAML file with the usual sections plus ``coconut:``; dotted overrides for all of them."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        data = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value.")
        dotted, raw = item.split("=", 1)
        *sections, key = dotted.strip().split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = yaml.safe_load(raw) if raw.strip() else ""
    cc = from_dict(CoconutConfig, data.pop("coconut", {}), "coconut")
    return from_dict(Config, data), cc


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
    x_btd, _ = run_blocks(model.coda, model.ln_f(state_btd), ctx)
    return model.ln_f(x_btd)


def head_logits(params: Params, hidden_btd: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The tied head, float32 logits (as `RecurrentDepthLM.decode`)."""
    wte = params["wte"].astype(hidden_btd.dtype)
    return jnp.einsum("btd,vd->btv", hidden_btd, wte, preferred_element_type=jnp.float32)


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
    mask_bt = batch["loss_mask"].astype(jnp.float32)
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, batch["targets"])
    num_tokens = jnp.maximum(mask_bt.sum(), 1.0)
    loss = (nll_bt * mask_bt).sum() / num_tokens
    correct_bt = (jnp.argmax(logits_btv, -1) == batch["targets"]).astype(jnp.float32)
    return loss, {"loss": loss, "accuracy": (correct_bt * mask_bt).sum() / num_tokens}


# ---------------------------------------------------------------------------------------------
# Curriculum: stages and batches (pure functions of the step, so resumption is exact).


def stage_plan(cc: CoconutConfig, steps_per_stage: int) -> list[tuple[int, int]]:
    """[(stage, steps)] in training order. Single-stage methods and runs without curriculum
    train the final stage for the budget of the whole curriculum."""
    stages = list(range(cc.final_stage + 1))
    total = steps_per_stage * (cc.max_latent_stage + 2)  # every method: the curriculum's budget
    if not cc.uses_latents or not cc.curriculum:
        return [(cc.final_stage, total)]
    return [(s, steps_per_stage) for s in stages]


def stage_at(plan: list[tuple[int, int]], step: int) -> tuple[int, int]:
    """(stage, index of the plan entry) of 0-based optimizer step ``step``."""
    end = 0
    for i, (stage, steps) in enumerate(plan):
        end += steps
        if step < end:
            return stage, i
    return plan[-1][0], len(plan) - 1


def is_stage_start(plan: list[tuple[int, int]], step: int) -> bool:
    """True at the first step of every plan entry after the first: the optimizer resets there."""
    starts = np.cumsum([steps for _, steps in plan])[:-1]
    return step in set(int(s) for s in starts)


def render_stage(example: Example, tok: Tokenizer, cc: CoconutConfig, stage: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss mask) of ``example`` at curriculum ``stage``."""
    if not cc.uses_latents:
        return render(example, tok, fmt=cc.method)
    k = min(stage, cc.max_latent_stage)
    if stage > cc.max_latent_stage:  # final stage: K·c latents and no language steps left
        example = Example(example.question, example.steps[:k], example.answer)
    return render(example, tok, fmt="coconut", num_latent_steps=k,
                  latents_per_step=cc.latents_per_step)


def eval_prompt(example: Example, tok: Tokenizer, cc: CoconutConfig) -> list[int]:
    """The test-time prompt: question, then (latent methods) ``<bot>``, K·c latents, ``<eot>``."""
    if not cc.uses_latents:
        return prompt_tokens(example, tok, fmt="nocot")
    return prompt_tokens(example, tok, fmt="coconut", num_latent_steps=cc.max_latent_stage,
                         latents_per_step=cc.latents_per_step)


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int
             ) -> dict[str, np.ndarray]:
    """Right-padded inputs/targets/loss_mask [rows, seq_len] (padding never counts)."""
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("inputs", "targets", "loss_mask")}
    out["inputs"][:] = pad_id
    for i, (tokens, mask) in enumerate(rows):
        n = len(tokens) - 1
        if n > seq_len:
            raise ValueError(f"an example needs {n} positions but train.seq_len={seq_len}: "
                             "raise train.seq_len (and model.max_seq_len).")
        out["inputs"][i, :n] = tokens[:-1]
        out["targets"][i, :n] = tokens[1:]
        out["loss_mask"][i, :n] = mask[1:]
    return out


def curriculum_batch(examples: Sequence[Example], tok: Tokenizer, cc: CoconutConfig,
                     stage: int, step: int, batch_size: int, seq_len: int, seed: int
                     ) -> dict[str, np.ndarray]:
    """The batch of 0-based optimizer ``step``: a pure function of (step, stage, seed).

    Examples go through a fresh permutation every epoch; with ``uniform_prob`` a row draws a
    uniformly random stage instead of ``stage`` (the reference's stage mixing).
    """
    n = len(examples)
    rows = []
    for i in range(batch_size):
        flat = step * batch_size + i
        epoch, offset = divmod(flat, n)
        index = int(np.random.default_rng([seed, epoch]).permutation(n)[offset])
        row_rng = np.random.default_rng([seed, step, i, 1])
        row_stage = stage
        if cc.uses_latents and cc.uniform_prob > 0 and row_rng.random() < cc.uniform_prob:
            row_stage = int(row_rng.integers(0, cc.final_stage + 1))
        rows.append(render_stage(examples[index], tok, cc, row_stage))
    return pad_rows(rows, seq_len, tok.pad_id)


# ---------------------------------------------------------------------------------------------
# Training: the project's train state, optimizer, shardings and checkpoint format, with the
# continuous-thought loss (rdlm.train's step is tied to `lm_loss`).


def train_depth(cfg: Config, cc: CoconutConfig, key: jax.Array) -> Depth:
    if cc.train_num_steps:
        return Depth(jnp.int32(0), jnp.int32(cc.train_num_steps), cc.train_num_steps)
    n_no_grad, n_grad = sample_depth(key, cfg.model.mean_recurrence, cfg.model.backprop_depth)
    return Depth(n_no_grad, n_grad, cfg.model.backprop_depth)


def eval_depth(cfg: Config, cc: CoconutConfig) -> Depth:
    r = cc.eval_num_steps or cc.train_num_steps or cfg.model.mean_recurrence
    return Depth(jnp.int32(r), jnp.int32(0), 0)


def make_coconut_step(cfg: Config, cc: CoconutConfig, latent_id: int) -> Any:
    """Jitted (state, batch) → (state, metrics): one optimizer step on `coconut_loss`.

    Memoised on what the step depends on (not the run directory or the data section), so runs
    that differ only there — tests, resumption in one process — compile once.
    """
    step_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir="",
                                                                  init_from=""),
                                   data=DataConfig())
    step_cc = dataclasses.replace(cc, eval_examples=1, eval_split="test", max_new_tokens=1,
                                  num_train_examples=1, steps_per_stage=0, epochs_per_stage=0)
    return _make_coconut_step(step_cfg, step_cc, latent_id)


@functools.lru_cache(maxsize=8)
def _make_coconut_step(cfg: Config, cc: CoconutConfig, latent_id: int) -> Any:
    from rdlm.train import TrainState, step_key
    tx = make_optimizer(cfg.train)

    def step(state: Any, batch: Batch) -> tuple[Any, dict[str, jax.Array]]:
        depth_key, noise_key = jax.random.split(step_key(cfg.seed, state.step))
        depth = train_depth(cfg, cc, depth_key)
        loss_fn = lambda p: coconut_loss(p, batch, cfg.model, latent_id=latent_id,
                                         max_latents=cc.max_latents, depth=depth, key=noise_key,
                                         init_scale=cc.init_scale,
                                         substitute=cc.method == "coconut",
                                         shift_sees_thoughts=cc.shift_sees_thoughts)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        finite = jnp.isfinite(metrics["loss"])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = TrainState(step=state.step + 1,
                               params=keep(optax.apply_updates(state.params, updates), state.params),
                               opt_state=keep(opt_state, state.opt_state),
                               bad_steps=state.bad_steps + (~finite),
                               bad_streak=(state.bad_streak + 1) * (~finite))
        return new_state, dict(metrics, grad_norm=optax.global_norm(grads),
                               r=depth.n_no_grad + depth.n_grad)

    return jax.jit(step, donate_argnums=(0,))


def training_examples(cfg: Config, cc: CoconutConfig) -> list[Example]:
    task = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
    return [example_at(task, "train", i, cfg.seed) for i in range(cc.num_train_examples)]


def steps_per_stage(cfg: Config, cc: CoconutConfig) -> int:
    if cc.epochs_per_stage:
        return max(1, math.ceil(cc.epochs_per_stage * cc.num_train_examples / cfg.train.batch_size))
    return cc.steps_per_stage


HISTORY_FILE = "metrics.jsonl"  # in the run directory: one line per logged step


def train_coconut(cfg: Config, cc: CoconutConfig, *, stop_after: int | None = None,
                  log: Any = print) -> dict[str, Any]:
    """Run (or resume) the whole curriculum in ``cfg.train.run_dir``.

    Checkpoints use the project's one format (params, optimizer, meta with step and stage,
    config) at every stage end and every ``train.checkpoint_every`` steps; a killed run restarts
    at its last checkpoint's step and stage. The optimizer state is reset at every stage change
    (also when a resumed run starts exactly on a stage boundary). ``stop_after`` stops after that
    many steps of this call (tests use it to simulate a kill). The returned ``history`` (also in
    ``run_dir/metrics.jsonl``) covers the whole run, earlier calls included, with cumulative
    training seconds in ``time_s``.
    """
    from rdlm.train import (TrainState, _truncate_jsonl, abstract_state, check_layout,
                            init_state, state_shardings)
    shard_lib.request_cpu_devices(cfg.mesh.cpu_devices)  # before the first device query
    if jax.process_count() > 1:
        raise ConfigError("rdlm coconut runs in one process (every process would build the same "
                         "global batch); use a single host, or `python -m rdlm train` for "
                         "multi-host runs.")
    tok = load_tokenizer(cfg.data.tokenizer)
    mesh = shard_lib.make_mesh(cfg.mesh)
    check_layout(cfg, mesh)
    # Rows split over the data-parallel axes (the params follow their logical rules), so that a
    # CPU host split by mesh.cpu_devices, or several accelerators, share each step.
    batch_sharding = shard_lib.batch_sharding(mesh)
    tx = make_optimizer(cfg.train)
    shardings = state_shardings(cfg, tx, mesh)
    plan = stage_plan(cc, steps_per_stage(cfg, cc))
    total = sum(steps for _, steps in plan)
    run_dir = Path(cfg.train.run_dir).expanduser().absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ckpt_lib.TrainCheckpointer(run_dir, save_every=cfg.train.checkpoint_every,
                                              keep_last=cfg.train.keep_last, keep_every=0,
                                              async_save=False)
    try:
        latest = checkpointer.latest_step()
        if latest is not None:
            target = abstract_state(cfg, tx, shardings)
            params, opt_state, meta, _ = checkpointer.restore(
                latest, abstract_params=target.params, abstract_opt_state=target.opt_state)
            state = TrainState(step=jnp.int32(meta["step"]), params=params, opt_state=opt_state,
                               bad_steps=jnp.int32(meta["bad_steps"]),
                               bad_streak=jnp.int32(meta["bad_streak"]))
            log(f"resumed from {checkpointer.directory / str(latest)} (step {latest}, stage "
                f"{meta.get('stage')})")
        else:
            params = None
            if cfg.train.init_from:
                _, params = ckpt_lib.load_params(cfg.train.init_from, shardings=shardings.params)
            state = init_state(cfg, tx, shardings, params)
        examples = training_examples(cfg, cc)
        step_fn = make_coconut_step(cfg, cc, tok.latent_id)
        start = int(state.step)
        # The logged steps of earlier calls up to the resumed one (the train loop's rule: steps
        # after the last checkpoint run again, a line cut by a kill is dropped).
        history = _truncate_jsonl(run_dir / HISTORY_FILE, start)
        t0 = time.perf_counter() - (history[-1]["time_s"] if history else 0.0)
        for step in range(start, total):
            if stop_after is not None and step - start >= stop_after:
                break
            stage, _ = stage_at(plan, step)
            if is_stage_start(plan, step):
                state = dataclasses.replace(state, opt_state=jax.jit(tx.init)(state.params))
            batch = curriculum_batch(examples, tok, cc, stage, step, cfg.train.batch_size,
                                     cfg.train.seq_len, cfg.seed)
            state, metrics = step_fn(state, jax.device_put(dict(batch), batch_sharding))
            done = step + 1
            if done % cfg.train.log_every == 0 or done == total or is_stage_start(plan, done):
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                history.append({"step": done, "stage": stage, **m,
                                "time_s": round(time.perf_counter() - t0, 2)})
                with open(run_dir / HISTORY_FILE, "a") as f:
                    f.write(json.dumps(history[-1]) + "\n")
                log(f"step {done}/{total} stage {stage} loss {m['loss']:.4f} "
                    f"acc {m['accuracy']:.3f} r {int(m['r'])} "
                    f"({time.perf_counter() - t0:.0f}s)")
            if checkpointer.should_save(done, total) or is_stage_start(plan, done):
                checkpointer.save(done, cfg=cfg, params=state.params, opt_state=state.opt_state,
                                  meta={**state.meta(), "stage": stage}, data_iterator=None)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return {"state": state, "history": history, "plan": plan}


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


def cli(argv: list[str]) -> int:
    """``python -m rdlm coconut CONFIG [section.key=value ...] [--eval-only]``."""
    parser = argparse.ArgumentParser(prog="python -m rdlm coconut",
                                     description="continuous-thought curriculum: train + evaluate")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--json", help="write the evaluation here")
    args = parser.parse_intermixed_args(argv)  # flags before or after the overrides
    try:
        cfg, cc = load_coconut_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        if args.eval_only:
            _, params = ckpt_lib.load_params(cfg.train.run_dir)
        else:
            params = train_coconut(cfg, cc)["state"].params
    except (ConfigError, ckpt_lib.CheckpointError) as err:  # as `rdlm train` reports them
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = evaluate_method(params, cfg, cc)
    print(f"{cc.method}: accuracy {result['accuracy']:.3f}, generated tokens "
          f"{result['generated_tokens']:.1f} on {result['num_examples']} {cc.eval_split} problems")
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in result.items()}, indent=1))
    return 0
