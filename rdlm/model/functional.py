"""The pure-functional API of the model (`rdlm.model.model`): one params pytree in, arrays out.

Modules are rebuilt from the params dict with `nnx.merge` inside the traced function
(`bind`), so no module state crosses a `jax.jit` boundary: `init_params`, `forward`,
`forward_train`, `core_step` and the losses are what the rest of the library calls.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rdlm.config import ModelConfig
from rdlm.model import backend, recurrence
from rdlm.model.attention import AttentionContext, attention_context
from rdlm.model.remat import RematPlan, remat_plan
from rdlm.model.model import Params, RecurrentDepthLM

@functools.lru_cache(maxsize=64)
def _abstract_model(cfg: ModelConfig) -> RecurrentDepthLM:
    return nnx.eval_shape(lambda: RecurrentDepthLM(cfg, rngs=nnx.Rngs(0)))


@functools.lru_cache(maxsize=64)
def _graphdefs(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    model = _abstract_model(cfg)
    return nnx.graphdef(model), nnx.graphdef(model.core)


def bind(params: Params, cfg: ModelConfig) -> RecurrentDepthLM:
    """The NNX model over ``params`` (cheap; call it inside the traced function)."""
    return nnx.merge(_graphdefs(cfg)[0], params)


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Fresh parameters with the "takase" init, as a nested dict of float32 arrays.

    Jitted: wrap it in ``jax.jit(..., out_shardings=...)`` to create parameters already sharded.
    """
    model = RecurrentDepthLM(cfg, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of the params pytree (`jax.ShapeDtypeStruct` leaves); allocates nothing."""
    return nnx.to_pure_dict(nnx.state(_abstract_model(cfg), nnx.Param))


def param_axes(cfg: ModelConfig) -> Params:
    """The params pytree's logical axis names: a tuple per leaf, e.g. ``("vocab", "embed")``."""
    state = nnx.state(_abstract_model(cfg), nnx.Param)
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.get_metadata()["axes"], state,
                                         is_leaf=lambda x: isinstance(x, nnx.Variable)))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters (tied embedding counted once), without allocating any."""
    return sum(group_sizes(cfg).values())


def group_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per top-level group ("wte", "prelude", "core", "coda", "ln_f", …), without
    allocating any."""
    return {name: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
            for name, tree in abstract_params(cfg).items()}


def initial_state(cfg: ModelConfig, shape: tuple[int, ...], *, key: jax.Array | None,
                  init_scale: float | jax.Array = 1.0) -> jax.Array:
    """s_0 ~ TruncNormal(±3σ) · σ · sqrt(d) · init_scale, σ = sqrt(2/(5d)); zeros without a key.

    ``init_scale=0`` (or no key) is the deterministic zero state; a concrete non-zero
    ``init_scale`` without a key is an error rather than a silent zero state.
    """
    dtype = jnp.dtype(cfg.dtype)
    if key is None:
        # A traced init_scale cannot be checked here; without a key the state is zero regardless.
        if isinstance(init_scale, (int, float)) and init_scale != 0:
            raise ValueError("a random initial state needs key=...; pass init_scale=0.0 for the "
                             "deterministic zero state.")
        return jnp.zeros(shape, dtype)
    noise = jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
    return (noise * (cfg.init_std * math.sqrt(cfg.d_model) * init_scale)).astype(dtype)


def core_step(params: Params, state_btd: jax.Array, embedded_btd: jax.Array, cfg: ModelConfig,
              ctx: AttentionContext) -> jax.Array:
    """One recurrence step s_i = core(adapter(concat[s_{i-1}, e])), as a pure function.

    ``params`` is the full params pytree or just ``{"core": params["core"]}``.
    """
    core = nnx.merge(_graphdefs(cfg)[1], params["core"])
    state_btd, _ = core(state_btd, embedded_btd, ctx)
    return state_btd


Constrain = Callable[[jax.Array], jax.Array]


def _step_fn(cfg: ModelConfig, constrain: Constrain | None = None) -> recurrence.StepFn:
    """`core_step` in the (consts, state) form the loops in `rdlm.recurrence` take; each new
    state goes through ``constrain`` (see `forward`)."""
    def step(consts: tuple[Params, jax.Array, AttentionContext], state_btd: jax.Array) -> jax.Array:
        core_params, embedded_btd, ctx = consts
        state_btd = core_step({"core": core_params}, state_btd, embedded_btd, cfg, ctx)
        return state_btd if constrain is None else constrain(state_btd)
    return step


def _check_key(key: jax.Array | None, init_scale: Any, init_state: jax.Array | None) -> None:
    """Checked before tracing, while ``init_scale`` is still a concrete number."""
    if key is None and init_state is None and isinstance(init_scale, (int, float)) and init_scale:
        raise ValueError("a random initial state needs key=...; pass init_scale=0.0 for the "
                         "deterministic zero state.")


def _check_tokens(tokens_bt: jax.Array, cfg: ModelConfig) -> None:
    if tokens_bt.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens_bt.shape)}.")
    if not jnp.issubdtype(tokens_bt.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {tokens_bt.dtype}.")
    if tokens_bt.shape[1] == 0:
        raise ValueError("tokens are empty: give at least one token per row.")
    if tokens_bt.shape[1] > cfg.max_seq_len:
        raise ValueError(f"sequence length {tokens_bt.shape[1]} exceeds model.max_seq_len="
                         f"{cfg.max_seq_len}; shorten the input or raise max_seq_len.")


def _run(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, recur: Any, *,
         key: jax.Array | None, init_scale: float | jax.Array, init_state: jax.Array | None,
         segment_ids: jax.Array | None, positions: jax.Array | None,
         branch_ids: jax.Array | None = None, constrain: Constrain | None = None,
         remat: RematPlan | None = None) -> tuple[jax.Array, dict]:
    """prelude → ``recur(step, consts, s_0)`` → coda; shared by `forward` and `forward_train`.

    ``remat``: the prelude's and coda's share of the training's `RematPlan`.
    """
    _check_tokens(tokens_bt, cfg)
    # The state constraint knows the mesh the batch is sharded over. Named as the program's
    # context, it is the mesh the attention kernels that XLA cannot partition run per shard of,
    # as in generation (`rdlm.model.backend`).
    with backend.names_mesh(getattr(constrain, "mesh", None)):
        model = bind(params, cfg)
        b, t = tokens_bt.shape
        ctx = attention_context(cfg, b, t, segment_ids=segment_ids, positions=positions,
                                branch_ids=branch_ids)
        embedded_btd, _ = model.apply_prelude(tokens_bt, ctx, remat=remat)
        if init_state is None:
            state_btd = initial_state(cfg, embedded_btd.shape, key=key, init_scale=init_scale)
        else:
            if init_state.shape != embedded_btd.shape:
                raise ValueError(f"init_state has shape {tuple(init_state.shape)}, expected "
                                 f"{tuple(embedded_btd.shape)} ([batch, length, d_model]).")
            state_btd = init_state.astype(embedded_btd.dtype)
        if constrain is not None:
            embedded_btd, state_btd = constrain(embedded_btd), constrain(state_btd)
        state_btd, aux = recur(_step_fn(cfg, constrain), (params["core"], embedded_btd, ctx),
                               state_btd)
        logits_btv, _ = model.apply_coda(state_btd, ctx, remat=remat)
        aux["state"] = state_btd
        return logits_btv, aux


def forward(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, *,
            num_steps: int | jax.Array, key: jax.Array | None = None,
            init_scale: float | jax.Array = 1.0, init_state: jax.Array | None = None,
            segment_ids: jax.Array | None = None, positions: jax.Array | None = None,
            branch_ids: jax.Array | None = None, return_trajectory: bool = False,
            constrain: Constrain | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [batch, length, vocab] (float32) after ``num_steps`` recurrence steps.

    - ``num_steps`` may be traced: ``jax.jit(forward, static_argnames=("cfg",))`` compiles once for
      every r.
    - ``init_scale=0.0`` (or ``key=None``) starts from the zero state: fully deterministic.
    - ``init_state`` [batch, length, d] replaces s_0 (continuous chain of thought, analysis).
    - ``segment_ids`` [batch, length] for packed/padded rows; ``branch_ids`` for several isolated
      continuations of one shared prefix (see `attention_context`); ``positions`` overrides the
      RoPE positions derived from them.
    - ``aux["state"]`` is the final latent s_r (before the final norm); with
      ``return_trajectory=True`` (``num_steps`` a Python int) ``aux["trajectory"]`` is
      ``ln_f(s_i)`` for i = 1..r, shaped [r, batch, length, d].
    - ``constrain``: a hashable function applied to e, s_0 and every step's state
      ([batch, length, d]), e.g. `rdlm.runtime.sharding.state_constraint(mesh)` to keep the latent
      sharded by the batch on a device mesh; None (the default) applies nothing.
    """
    _check_key(key, init_scale, init_state)
    if return_trajectory:
        if not isinstance(num_steps, (int, np.integer)):
            raise TypeError("return_trajectory=True needs num_steps as a Python int (the "
                            f"trajectory's length is a shape); got {type(num_steps).__name__}.")
        return _forward_trajectory(params, tokens_bt, cfg, int(num_steps), key, init_scale,
                                   init_state, segment_ids, positions, branch_ids, constrain)
    return _forward(params, tokens_bt, cfg, num_steps, key, init_scale, init_state, segment_ids,
                    positions, branch_ids, constrain)


@functools.partial(jax.jit, static_argnums=(2, 10))
def _forward(params, tokens_bt, cfg, num_steps, key, init_scale, init_state, segment_ids, positions,
             branch_ids, constrain):
    def recur(step, consts, state):
        return recurrence.iterate(step, consts, state, num_steps), {}
    return _run(params, tokens_bt, cfg, recur, key=key, init_scale=init_scale,
                init_state=init_state, segment_ids=segment_ids, positions=positions,
                branch_ids=branch_ids, constrain=constrain)


@functools.partial(jax.jit, static_argnums=(2, 3, 10))
def _forward_trajectory(params, tokens_bt, cfg, num_steps, key, init_scale, init_state,
                        segment_ids, positions, branch_ids, constrain):
    def recur(step, consts, state):
        state, states_rbtd = recurrence.iterate_collect(step, consts, state, num_steps)
        return state, {"trajectory": bind(params, cfg).ln_f(states_rbtd)}
    return _run(params, tokens_bt, cfg, recur, key=key, init_scale=init_scale,
                init_state=init_state, segment_ids=segment_ids, positions=positions,
                branch_ids=branch_ids, constrain=constrain)


def forward_train(params: Params, tokens_bt: jax.Array, cfg: ModelConfig, *,
                  n_no_grad: int | jax.Array, n_grad: int | jax.Array,
                  key: jax.Array | None = None, init_scale: float | jax.Array = 1.0,
                  init_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                  branch_ids: jax.Array | None = None, constrain: Constrain | None = None
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`forward` with truncated backprop: ``n_no_grad`` steps without gradient, then
    ``n_grad <= cfg.backprop_depth`` steps with gradient, rematerialised as ``cfg.remat`` and
    ``cfg.remat_policy`` say (`remat_plan`).

    Both counts may be traced: one compilation serves every sampled depth.
    """
    _check_key(key, init_scale, init_state)
    return _forward_train(params, tokens_bt, cfg, n_no_grad, n_grad, key, init_scale, init_state,
                          segment_ids, branch_ids, constrain)


@functools.partial(jax.jit, static_argnums=(2, 10))
def _forward_train(params, tokens_bt, cfg, n_no_grad, n_grad, key, init_scale, init_state,
                   segment_ids, branch_ids, constrain):
    plan = remat_plan(cfg)

    def recur(step, consts, state):
        state = recurrence.iterate_no_grad(step, consts, state, n_no_grad)
        state = recurrence.iterate_with_grad(
            step, consts, state, n_grad, cfg.backprop_depth, remat=plan.core,
            mask_skipped=recurrence.mostly_full_backprop(cfg.mean_recurrence, cfg.backprop_depth),
            policy=plan.policy)
        return state, {}
    return _run(params, tokens_bt, cfg, recur, key=key, init_scale=init_scale,
                init_state=init_state, segment_ids=segment_ids, positions=None,
                branch_ids=branch_ids, constrain=constrain, remat=plan)


def lm_loss(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, *,
            n_no_grad: int | jax.Array, n_grad: int | jax.Array, key: jax.Array | None = None,
            init_scale: float | jax.Array = 1.0, constrain: Constrain | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy under truncated backprop.

    ``batch``: ``inputs`` and ``targets`` [batch, length] int; optional ``loss_mask`` (1 where a
    target counts), ``segment_ids`` (packed documents) and ``branch_ids`` (isolated continuations
    of a shared prefix). ``constrain``: see `forward`. Returns (loss, metrics).
    """
    logits_btv, _ = forward_train(params, batch["inputs"], cfg, n_no_grad=n_no_grad,
                                    n_grad=n_grad, key=key, init_scale=init_scale,
                                    segment_ids=batch.get("segment_ids"),
                                    branch_ids=batch.get("branch_ids"), constrain=constrain)
    return masked_token_loss(logits_btv, batch["targets"], batch.get("loss_mask"))


def token_loss_sums(logits_btv: jax.Array, targets_bt: jax.Array,
                    loss_mask_bt: jax.Array | None = None) -> dict[str, jax.Array]:
    """Summed next-token cross-entropy, summed correct argmax predictions and the token count,
    over the positions where ``loss_mask_bt`` is 1 (all positions without a mask).

    Sums, not means, so that batches and micro-batches combine exactly.
    """
    mask_bt = (jnp.ones(targets_bt.shape, jnp.float32) if loss_mask_bt is None
               else loss_mask_bt.astype(jnp.float32))
    nll_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, targets_bt)
    correct_bt = (jnp.argmax(logits_btv, -1) == targets_bt).astype(jnp.float32)
    return {"nll": (nll_bt * mask_bt).sum(), "correct": (correct_bt * mask_bt).sum(),
            "num_tokens": mask_bt.sum()}


def masked_token_loss(logits_btv: jax.Array, targets_bt: jax.Array,
                      loss_mask_bt: jax.Array | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean token loss, {loss, accuracy, num_tokens}) over the masked positions: the objective
    of every trainer (plain LM, continuous thought)."""
    sums = token_loss_sums(logits_btv, targets_bt, loss_mask_bt)
    num_tokens = jnp.maximum(sums["num_tokens"], 1.0)
    loss = sums["nll"] / num_tokens
    return loss, {"loss": loss, "accuracy": sums["correct"] / num_tokens,
                  "num_tokens": sums["num_tokens"]}
