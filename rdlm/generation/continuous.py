"""Depth-continuous batching: every row at its own (token, iteration), and a queue of prompts.

    queue of prompts ─▶ B rows ─▶ lax.while_loop, each iteration:
        refill   idle rows take the next prompts: a copy of the prompt's prefill, staged with
                 the next ``stage_rows`` prompts' (one prefill at the full r), and its first
                 token
        advance  rows with a new token run it through the prelude and restart the core
        iterate  every running row runs one core step; a row whose token converged (exit
                 criterion) or reached r stops and waits
        finish   the waiting rows run the coda, write their tokens' cache entries and sample
                 their next tokens together, once they have waited long enough (below)

In the lockstep programs (`rdlm.generation.programs`) a batched token step lasts until its
slowest row has exited, so the iterations that adaptive exit saves on the other rows are idle
rows, not throughput. Here a row that exits goes on to its next token at once, and a row that
finishes its sequence takes the next prompt, so every iteration advances every busy row.

- Each row holds its prompt from position 0 of its cache row (no padding) and decodes at its own
  position; the mask, RoPE and cache reads and writes are per row (`rdlm.generation.rows`). The
  cache rule is the engine's: step i uses slot ``i mod num_slots``; a position that stopped
  earlier is read at its latest entry. A token's own core entries go to a one-position block
  buffer, merged into the cache when the token is done.
- Given the same exit decisions a row computes what the lockstep engine computes for it; with
  zero initial states greedy tokens are the same.
- The token-boundary work (the coda of the finished tokens, the prelude of the next ones) reads
  the weights of three stages whether one row needs it or all of them; where decoding is bound
  by weight reads (small batches, on any hardware) running it at every iteration for the one
  or two rows that just finished costs a good part of a core step each time. So rows at a
  boundary wait, and run it together once the row-iterations they have spent waiting reach
  ``boundary_wait`` (or no row is left iterating): the rent-or-buy rule, waiting until the idle
  rows have cost about what one pass costs (`default_boundary_wait`). What waits is what is
  left to run: the coda and the prelude, or under a distribution criterion (KL, entropy…), whose
  check has just run the coda of every row, the prelude alone: those rows emit their tokens at
  once and wait for their next token's prelude. 0 runs every row's boundary work at once.
- ``num_steps``, the exit threshold and ``boundary_wait`` are data: one compilation serves every
  r, threshold and wait
  (with a fixed ``cache_budget``). The static shape is (rows, prompt bucket, new tokens, queue
  length), the queue padded to rows × a power of two.
- Random initial states and sampling keys derive from (prompt, position) and (prompt, token
  index), so a prompt draws the same numbers whatever row and iteration it runs in.
- Over a mesh (`continuous_on_groups_jit`) every data-parallel group of devices runs this
  program on its own share of the queue, the model split over the group's "tensor" devices
  (replicated when that axis is 1); a prompt's index is its index among all the prompts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rdlm.generation import cache as kvc
from rdlm.generation.cache import KVCache
from rdlm.generation.engine import forward_block, token_input
from rdlm.generation.exits import ExitConfig, ExitState, evaluate, init_exit_state
from rdlm.generation.plan import PAD_ID, Plan, pass_weights
from rdlm.generation.programs import _is_stop
from rdlm.generation.rows import (CodaRows, PreludeRows, choose_rows, coda_of_rows, coda_rows,
                                  core_step_rows, gathered_or_whole, prelude_rows,
                                  row_context, row_keys, start_states, write_prelude_rows)
from rdlm.config import ModelConfig
from rdlm.model import Params
from rdlm.model.kernels import to_loop_layout
from rdlm.runtime import sharding


class Queue(NamedTuple):
    """The prompts, right-padded: [queue, prompt_len] ids, each length, and how many are real;
    ``first``: the first one's index among the call's prompts (a group's share of them starts
    there), from which the prompts' random numbers derive."""

    prompts_qt: jax.Array
    lengths_q: jax.Array
    count: jax.Array
    first: Any = 0


class RowCarry(NamedTuple):
    """The loop's state: per row, its prompt, its current token and where that token is."""

    cache: KVCache
    block: KVCache  # the current token's own core entries, one position per row
    embedded_b1d: jax.Array  # the current token's prelude output e
    state_b1d: jax.Array
    step_b: jax.Array  # core steps the current token has run
    position_b: jax.Array  # the current token's cache position (a prompt's last, at first)
    memory: ExitState | None  # the exit criterion's memory (None at fixed r)
    value_b: jax.Array  # the criterion's value at the last evaluation
    token_b: jax.Array  # the last token emitted
    prompt_b: jax.Array  # the prompt the row serves
    emitted_b: jax.Array  # tokens emitted for it
    running_b: jax.Array  # in the core loop
    waiting_b: jax.Array  # its token is done (converged or at r), its boundary work not yet run
    waited: jax.Array  # row-iterations spent at a boundary by the rows waiting now (`_due`)
    pending_b: jax.Array  # emitted a token that has yet to enter the prelude
    next_prompt: jax.Array  # the queue's head
    out: dict[str, jax.Array]  # per prompt: tokens, steps, exit values, lengths (, logits)
    iterations: jax.Array  # core iterations of the loop
    busy: jax.Array  # row-iterations that ran a core step
    boundaries: jax.Array  # token-boundary passes run (coda, sampling) after the first tokens
    prelude_passes: jax.Array  # passes over the prelude's weights (`_advance`), of any rows
    coda_passes: jax.Array  # over the coda's and the head's: exit checks, and finishing rows
    staged: KVCache  # the prefills of the next ``stage_rows`` prompts, their positions only
    staged_logits_sv: jax.Array  # their last positions' logits and final states
    staged_state_s1d: jax.Array
    stage_base: jax.Array  # the queue index of the first staged prompt
    prefills: jax.Array  # batched prefills run


class Keys(NamedTuple):
    sample: jax.Array
    state: jax.Array
    first: Any  # `Queue.first`: a prompt's random numbers follow its index among all prompts


def _where_rows(rows_b: jax.Array, new: Any, old: Any) -> Any:
    """Per row: ``new`` where ``rows_b``, else ``old`` (pytrees with a leading row axis)."""
    return jax.tree.map(lambda n, o: jnp.where(rows_b.reshape((-1,) + (1,) * (o.ndim - 1)),
                                               n.astype(o.dtype), o), new, old)


def _outputs(plan: Plan) -> dict[str, jax.Array]:
    q, n = plan.queue, plan.out_len
    out = {"tokens": jnp.full((q, n), PAD_ID, jnp.int32), "steps": jnp.zeros((q, n), jnp.int32),
           "exit_values": jnp.full((q, n), jnp.nan, jnp.float32),
           "lengths": jnp.zeros((q,), jnp.int32)}
    if plan.return_logits:
        out["logits"] = jnp.zeros((q, n, plan.cfg.vocab_size), jnp.float32)
    return out


def _emit(plan: Plan, c: RowCarry, rows_b: jax.Array, token_b: jax.Array, steps_b: jax.Array,
          value_b: jax.Array, logits_bv: jax.Array) -> RowCarry:
    """The rows in ``rows_b`` emit ``token_b``: it is recorded for their prompts; a row whose
    sequence is complete (stop token, or ``max_new_tokens``) becomes idle, the others pending."""
    prompt_w = jnp.where(rows_b, c.prompt_b, plan.queue)  # out of range: not written
    n_b = c.emitted_b
    out = dict(c.out)
    out["tokens"] = out["tokens"].at[prompt_w, n_b].set(token_b, mode="drop")
    out["steps"] = out["steps"].at[prompt_w, n_b].set(steps_b, mode="drop")
    out["exit_values"] = out["exit_values"].at[prompt_w, n_b].set(value_b, mode="drop")
    if plan.return_logits:
        out["logits"] = out["logits"].at[prompt_w, n_b].set(logits_bv, mode="drop")
    emitted_b = n_b + rows_b.astype(jnp.int32)
    out["lengths"] = out["lengths"].at[prompt_w].set(emitted_b, mode="drop")
    complete_b = _is_stop(token_b, plan.stop_tokens) | (emitted_b >= plan.max_new_tokens)
    return c._replace(
        out=out, emitted_b=emitted_b, token_b=jnp.where(rows_b, token_b, c.token_b),
        position_b=c.position_b + rows_b.astype(jnp.int32), running_b=c.running_b & ~rows_b,
        waiting_b=c.waiting_b & ~rows_b, pending_b=c.pending_b | (rows_b & ~complete_b))


def _prefill(params: Params, plan: Plan, prompts_bt: jax.Array, lengths_b: jax.Array,
             prompt_b: jax.Array, num_steps: jax.Array, keys: Keys
             ) -> tuple[KVCache, jax.Array, jax.Array]:
    """Prompts from position 0 of a fresh cache of their positions only, at the full r (no
    exit): the cache, and the logits and final state of each prompt's last position."""
    cfg = plan.cfg
    b, length = prompts_bt.shape
    cache = kvc.init_cache(cfg, b, length, plan.num_slots, plan.track_latest)
    state_btd = start_states(plan, row_keys(keys.state, keys.first + prompt_b,
                                            jnp.zeros_like(prompt_b)),
                             length)
    # Padding follows each prompt, so causality alone keeps it out of the real positions.
    last_b = lengths_b - 1
    out, cache = forward_block(params, plan, cache, token_input(params, cfg, prompts_bt),
                               jnp.zeros((b,), jnp.int32), 0, num_steps, state_btd,
                               with_prefix=False, logits_at_b=last_b)
    return cache, out.logits_btv[:, 0], out.state_btd[jnp.arange(b), last_b][:, None]


def _stage(params: Params, plan: Plan, queue: Queue, base: jax.Array, num_steps: jax.Array,
           keys: Keys) -> tuple[KVCache, jax.Array, jax.Array]:
    """`_prefill` of the ``stage_rows`` prompts from queue index ``base`` together, for the
    rows that will take them (past the real prompts, padding: computed, never taken)."""
    s = plan.stage_rows
    return _prefill(params, plan, lax.dynamic_slice_in_dim(queue.prompts_qt, base, s),
                    lax.dynamic_slice_in_dim(queue.lengths_q, base, s),
                    base + jnp.arange(s, dtype=jnp.int32), num_steps, keys)


def _start(params: Params, plan: Plan, queue: Queue, num_steps: jax.Array,
           keys: Keys) -> RowCarry:
    """Every row idle over an empty cache, the first ``stage_rows`` prompts staged: the first
    refill hands them out."""
    cfg, b = plan.cfg, plan.batch
    zeros_b, no_b = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool)
    state_b1d = jnp.zeros((b, 1, cfg.d_model), jnp.dtype(cfg.dtype))
    staged, staged_logits_sv, staged_state_s1d = _stage(params, plan, queue, jnp.int32(0),
                                                        num_steps, keys)
    return RowCarry(
        cache=kvc.init_cache(cfg, b, plan.cache_len, plan.num_slots, plan.track_latest),
        block=kvc.init_cache(cfg, b, 1, plan.num_slots, plan.track_latest),
        embedded_b1d=state_b1d, state_b1d=state_b1d, step_b=zeros_b, position_b=zeros_b,
        memory=None if plan.exit is None else init_exit_state(state_b1d[:, 0], cfg.vocab_size),
        value_b=jnp.full((b,), jnp.inf, jnp.float32), token_b=zeros_b, prompt_b=zeros_b,
        emitted_b=zeros_b, running_b=no_b, waiting_b=no_b, waited=jnp.int32(0), pending_b=no_b,
        next_prompt=jnp.int32(0), out=_outputs(plan), iterations=jnp.int32(0),
        busy=jnp.int32(0), boundaries=jnp.int32(0), prelude_passes=jnp.int32(0),
        coda_passes=jnp.int32(0), staged=staged,
        staged_logits_sv=staged_logits_sv, staged_state_s1d=staged_state_s1d,
        stage_base=jnp.int32(0), prefills=jnp.int32(1))


def _idle(c: RowCarry) -> jax.Array:
    return ~(c.running_b | c.waiting_b | c.pending_b)


def _refill(params: Params, plan: Plan, queue: Queue, num_steps: jax.Array, keys: Keys,
            c: RowCarry) -> RowCarry:
    """Idle rows take the next prompts, one at a time: each copies its prompt's staged prefill
    into its cache row and emits the first token. Once the staged prompts are all taken, the
    next ``stage_rows`` are prefilled together: a prefill runs the whole recurrence over the
    prompt, and one of a single short prompt costs nearly what one of many does where weight
    reads bound it (and twice as much per row on a CPU), while rows fall idle one at a time
    (`rdlm.generation.plan.default_stage_rows`)."""
    b, s = plan.batch, plan.stage_rows

    def wanted(c: RowCarry) -> jax.Array:
        return jnp.any(_idle(c)) & (c.next_prompt < queue.count)

    def restage(c: RowCarry) -> RowCarry:
        staged, logits_sv, state_s1d = _stage(params, plan, queue, c.next_prompt, num_steps, keys)
        return c._replace(staged=staged, staged_logits_sv=logits_sv, staged_state_s1d=state_s1d,
                          stage_base=c.next_prompt, prefills=c.prefills + 1)

    def one(c: RowCarry) -> RowCarry:
        q = c.next_prompt
        c = lax.cond(q - c.stage_base >= s, restage, lambda c: c, c)
        row, slot = jnp.argmax(_idle(c)), q - c.stage_base
        state_11d = lax.dynamic_slice_in_dim(c.staged_state_s1d, slot, 1)
        logits_1v = lax.dynamic_slice_in_dim(c.staged_logits_sv, slot, 1)
        here_b = jnp.arange(b) == row
        c = c._replace(
            cache=kvc.put_row(c.cache, c.staged, slot, row),
            state_b1d=_where_rows(here_b, jnp.broadcast_to(state_11d, c.state_b1d.shape),
                                  c.state_b1d),
            prompt_b=jnp.where(here_b, q, c.prompt_b), emitted_b=jnp.where(here_b, 0, c.emitted_b),
            position_b=jnp.where(here_b, queue.lengths_q[q] - 1, c.position_b),
            next_prompt=q + 1)
        token_1 = choose_rows(logits_1v, row_keys(keys.sample, keys.first + q[None],
                                                  jnp.zeros((1,), jnp.int32)), plan.sampling)
        return _emit(plan, c, here_b, jnp.broadcast_to(token_1, (b,)),
                     jnp.full((b,), num_steps, jnp.int32), jnp.full((b,), jnp.nan, jnp.float32),
                     jnp.broadcast_to(logits_1v, (b, logits_1v.shape[-1])))

    return lax.while_loop(wanted, one, c)


def _prelude_waits(exit_cfg: ExitConfig | None) -> bool:
    """Whether rows at a token boundary wait for their prelude (finishing at once) rather than
    for their coda: under a distribution criterion, whose check has just run the coda and the
    head of every row, so that a row finishing at once reuses them, and one that waited for
    its coda would run it again."""
    return exit_cfg is not None and exit_cfg.needs_logits


def default_boundary_wait(cfg: ModelConfig, batch: int, exit_cfg: ExitConfig | None) -> int:
    """Row-iterations rows at a token boundary wait, in all, before the rest of their boundary
    work runs: about what one pass of it costs, counted in the row-iterations of core steps it
    would buy.

    Where decoding is bound by weight reads, an iteration costs the core's weights (and the
    coda's and head's, which a distribution criterion's check reads every ``check_every``
    steps) and serves ``batch`` rows, so a row-iteration costs a ``batch``-th of that; the
    boundary pass reads the weights of the prelude, and of the coda and head unless the exit
    check has just run them (`_prelude_waits`), whatever the number of rows it serves. Waiting
    while the idle rows cost less than the pass (rent or buy) keeps the total within twice the
    best schedule in hindsight. No wait for one row: nothing would share its pass."""
    if batch <= 1:
        return 0
    w = pass_weights(cfg)
    if _prelude_waits(exit_cfg):  # the pass is the prelude; an iteration also runs the check
        return round(batch * w["prelude"] / (w["core"] + w["coda"] / exit_cfg.check_every))
    return round(batch * (w["prelude"] + w["coda"]) / w["core"])


def few_rows(batch: int) -> int:
    """Up to how many rows the token-boundary work (coda, prelude) gathers into a pass of their
    own, rather than one over the whole batch (`rdlm.generation.rows.gathered_or_whole`): a
    quarter of the rows. Running it for every row whenever one of them finishes a token would
    cost about a core step (the coda and the prelude, two of four layers each at the usual
    shapes) at nearly every iteration of a large batch, where some row finishes a token almost
    always."""
    return max(1, -(-batch // 4))


def _advance(params: Params, plan: Plan, keys: Keys, c: RowCarry) -> RowCarry:
    """Every pending row runs its new token through the prelude and restarts the core at step
    0, from s_0 or, under continuous CoT, from the previous token's final state."""
    cfg = plan.cfg
    rows_b = c.pending_b

    def gathered(rows_k: jax.Array) -> PreludeRows:
        return prelude_rows(params, cfg, c.cache.prelude, c.cache.shift_bases_btd,
                            c.token_b[rows_k], c.position_b[rows_k], rows_k)

    def whole() -> PreludeRows:
        return prelude_rows(params, cfg, c.cache.prelude, c.cache.shift_bases_btd, c.token_b,
                            c.position_b)

    out = gathered_or_whole(rows_b, few_rows(plan.batch), gathered, whole)
    cache = write_prelude_rows(c.cache, out, c.position_b, rows_b)
    start_b1d = (c.state_b1d if plan.continuous_cot else
                 start_states(plan, row_keys(keys.state, keys.first + c.prompt_b, c.position_b),
                              1))
    memory = c.memory
    if memory is not None:
        memory = _where_rows(rows_b, init_exit_state(start_b1d[:, 0], cfg.vocab_size), memory)
    return c._replace(
        cache=cache, embedded_b1d=_where_rows(rows_b, out.embedded_k1d, c.embedded_b1d),
        state_b1d=_where_rows(rows_b, start_b1d, c.state_b1d),
        step_b=jnp.where(rows_b, 0, c.step_b), memory=memory,
        value_b=jnp.where(rows_b, jnp.inf, c.value_b), running_b=c.running_b | rows_b,
        pending_b=c.pending_b & ~rows_b, prelude_passes=c.prelude_passes + 1,
        # The wait paid for this pass under `_prelude_waits`; otherwise it is the wait of
        # rows still waiting for their coda, which a refill's pending rows leave alone.
        waited=jnp.int32(0) if _prelude_waits(plan.exit) else c.waited)


def _converged(plan: Plan, value_b: jax.Array, threshold: jax.Array) -> jax.Array:
    if plan.exit.criterion == "argmax-stability":  # the value counts agreeing evaluations
        return value_b >= threshold
    return value_b < threshold


def _iterate(params: Params, plan: Plan, num_steps: jax.Array, threshold: jax.Array,
             boundary_wait: jax.Array, keys: Keys, c: RowCarry) -> RowCarry:
    """One core step of every running row; rows whose token is done stop and wait, and the
    waiting rows run the coda and emit once they have waited ``boundary_wait`` row-iterations
    in all, or no row is left iterating (under `_prelude_waits`, at once: the check ran it)."""
    cfg, exit_cfg = plan.cfg, plan.exit
    active_b = c.running_b
    ctx = row_context(cfg, c.position_b, plan.cache_len)
    state_b1d, block = core_step_rows(params, cfg, plan.num_slots, c.cache, c.block, c.state_b1d,
                                      c.embedded_b1d, ctx, c.step_b, active_b)
    step_b = c.step_b + active_b.astype(jnp.int32)

    def coda(state: jax.Array) -> CodaRows:
        return coda_rows(params, cfg, c.cache.coda, state, ctx)

    coda_out, fresh_b, memory, value_b = None, jnp.zeros_like(active_b), c.memory, c.value_b
    coda_passes = c.coda_passes
    done_b = active_b & (step_b >= num_steps)
    if exit_cfg is not None:
        check_b = active_b & (step_b % exit_cfg.check_every == 0)
        blank = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                              jax.eval_shape(coda, state_b1d))
                 if exit_cfg.needs_logits else None)

        def check(memory: ExitState) -> tuple:
            # The coda on the candidate states; the finishing rows keep its entries.
            out = coda(state_b1d) if exit_cfg.needs_logits else None
            value, _, new_memory = evaluate(exit_cfg, memory, state_b1d[:, 0],
                                            None if out is None else out.logits_bv)
            return value, _where_rows(check_b, new_memory, memory), out

        def no_check(memory: ExitState) -> tuple:
            return c.value_b, memory, blank

        value, memory, coda_out = lax.cond(jnp.any(check_b), check, no_check, c.memory)
        if exit_cfg.needs_logits:
            coda_passes += jnp.any(check_b).astype(jnp.int32)
        value_b = jnp.where(check_b, value, c.value_b)
        converged_b = check_b & _converged(plan, value, threshold) & (step_b >= exit_cfg.min_steps)
        done_b = done_b | (active_b & converged_b)
        fresh_b = check_b if exit_cfg.needs_logits else fresh_b

    waiting_b = c.waiting_b | done_b
    c = c._replace(block=block, state_b1d=state_b1d, step_b=step_b, memory=memory,
                   value_b=value_b, running_b=c.running_b & ~done_b, waiting_b=waiting_b,
                   iterations=c.iterations + 1, coda_passes=coda_passes,
                   busy=c.busy + jnp.sum(active_b.astype(jnp.int32)))

    def finish(c: RowCarry) -> RowCarry:
        # A waiting row's state, step count, value and block buffer stayed as they were when
        # its token finished: the other rows' steps leave inactive rows alone.
        cache = kvc.merge_rows(c.cache, c.block, c.position_b, waiting_b, c.step_b)
        # The check's coda (every row's candidate state) serves the rows that finished at this
        # evaluation; the others (fixed r, the latent criteria, a cap reached between checks,
        # rows that finished at an earlier iteration and waited) run it now, and only they.
        late_b = waiting_b & ~(done_b & fresh_b)

        def late() -> CodaRows:
            return coda_of_rows(params, cfg, cache.coda, c.state_b1d, c.position_b, late_b,
                                few_rows(plan.batch))

        if coda_out is None:
            out = late()
            late_passes = jnp.int32(1)
        else:
            out = lax.cond(jnp.any(late_b), late, lambda: coda_out)
            late_passes = jnp.any(late_b).astype(jnp.int32)
            out = _where_rows(fresh_b, coda_out, out)
        logits_bv = out.logits_bv
        cache = cache._replace(coda=kvc.write_stage_rows(cache.coda, out.kvs, c.position_b,
                                                         waiting_b))
        token_b = choose_rows(logits_bv, row_keys(keys.sample, keys.first + c.prompt_b,
                                                  c.emitted_b), plan.sampling)
        value_b = (c.value_b if exit_cfg is not None
                   else jnp.full_like(c.value_b, jnp.nan))
        # (Under `_prelude_waits` the rows waiting for their prelude keep their wait.)
        waited = c.waited if _prelude_waits(exit_cfg) else jnp.int32(0)
        c = c._replace(cache=cache, waited=waited, boundaries=c.boundaries + 1,
                       coda_passes=c.coda_passes + late_passes)
        return _emit(plan, c, waiting_b, token_b, c.step_b, value_b, logits_bv)

    def wait(c: RowCarry) -> RowCarry:
        return c._replace(waited=c.waited + jnp.sum(waiting_b.astype(jnp.int32)))

    if _prelude_waits(exit_cfg):  # the coda has run: emit at once, the prelude waits
        return lax.cond(jnp.any(waiting_b), finish, lambda c: c, c)
    return lax.cond(jnp.any(waiting_b) & _due(c, waiting_b, boundary_wait), finish, wait, c)


def _due(c: RowCarry, rows_b: jax.Array, boundary_wait: jax.Array) -> jax.Array:
    """Whether the rows at a boundary, ``rows_b``, run their pass now: when waiting one more
    iteration would take the row-iterations spent waiting past ``boundary_wait`` (rent or buy,
    never overshooting: many rows can reach a boundary at the same iteration), or when no row
    is left iterating."""
    waited = c.waited + jnp.sum(rows_b.astype(jnp.int32))
    return (waited > boundary_wait) | ~jnp.any(c.running_b)


def _generate_rows(params: Params, queue: Queue, num_steps: jax.Array, threshold: jax.Array,
                   boundary_wait: jax.Array, key: jax.Array, plan: Plan
                   ) -> dict[str, jax.Array]:
    params = to_loop_layout(params)
    keys = Keys(*jax.random.split(key), queue.first)

    def more(c: RowCarry) -> jax.Array:
        return jnp.any(~_idle(c)) | (jnp.any(_idle(c)) & (c.next_prompt < queue.count))

    def pend(c: RowCarry) -> RowCarry:
        return c._replace(waited=c.waited + jnp.sum(c.pending_b.astype(jnp.int32)))

    def body(c: RowCarry) -> RowCarry:
        c = _refill(params, plan, queue, num_steps, keys, c)
        advance = jnp.any(c.pending_b)
        if _prelude_waits(plan.exit):
            advance &= _due(c, c.pending_b, boundary_wait)
        c = lax.cond(advance, lambda c: _advance(params, plan, keys, c), pend, c)
        return _iterate(params, plan, num_steps, threshold, boundary_wait, keys, c)

    c = lax.while_loop(more, body, _start(params, plan, queue, num_steps, keys))
    return {**c.out, "iterations": c.iterations, "busy": c.busy, "boundaries": c.boundaries,
            "prefills": c.prefills, "prelude_passes": c.prelude_passes,
            "coda_passes": c.coda_passes}


continuous_jit = jax.jit(_generate_rows, static_argnames=("plan",))


def _generate_on_groups(params: Params, queues: Queue, num_steps: jax.Array,
                        threshold: jax.Array, boundary_wait: jax.Array, key: jax.Array,
                        plan: Plan, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """`_generate_rows` in every data-parallel group of ``mesh`` at once (one coordinate of its
    "data" and "fsdp" axes), each over its own queue: the leading axis of ``queues`` and of every
    output is the group. No group waits for another. Within a group the model is split as
    ``params`` are placed (over "tensor": `sharding.GROUP_RULES`) and XLA partitions the loop
    over those devices, which run it together."""
    groups = sharding.data_axes()
    shard, whole = jax.sharding.PartitionSpec(groups), jax.sharding.PartitionSpec()

    def one(params: Params, queue: Queue, *scalars: jax.Array) -> dict[str, jax.Array]:
        out = _generate_rows(params, jax.tree.map(lambda x: x[0], queue), *scalars, plan=plan)
        return jax.tree.map(lambda x: x[None], out)

    return jax.shard_map(one, mesh=mesh, in_specs=(whole, shard, whole, whole, whole, whole),
                         out_specs=shard, axis_names=sharding.group_axes(mesh),
                         check_vma=False)(
        params, queues, num_steps, threshold, boundary_wait, key)


continuous_on_groups_jit = jax.jit(_generate_on_groups, static_argnames=("plan", "mesh"))
