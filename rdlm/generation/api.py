"""``rdlm.generate``: prompts in, tokens out, with every inference feature of SPEC §1.

    out = rdlm.generate(params, cfg, [[1, 2, 3]], max_new_tokens=32, num_steps=32, exit="kl")
    out = rdlm.generate(params, cfg, ["The capital of"], tokenizer=tok, max_new_tokens=32,
                        num_steps=32)
    out.texts  # each completion, decoded
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Sequence

import jax
import numpy as np

from rdlm.config import ModelConfig
from rdlm.generation.exits import ExitConfig
from rdlm.generation.continuous import (Queue, continuous_jit, continuous_on_groups_jit,
                                        default_boundary_wait)
from rdlm.generation.plan import (PAD_ID, Plan, SamplingConfig, SpeculativeConfig, ThoughtConfig,
                                  continuous_plan, left_pad, make_plan, plan_cache_bytes,
                                  prompt_bucket, prompt_rows)
from rdlm.generation.programs import generate_jit
from rdlm.model import Params
from rdlm.runtime import sharding
from jax.sharding import NamedSharding, PartitionSpec

if TYPE_CHECKING:  # the tokenizer's module (and its `tokenizers` dependency) loads only if used
    from rdlm.data.tokenizer import Tokenizer


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns (NumPy arrays, one row per prompt).

    ``tokens`` [batch, max_new_tokens]: generated ids; after a row's stop token (kept) the rest is
    ``PAD_ID``. ``steps`` [batch, max_new_tokens]: core iterations that produced each token's
    distribution (the first token comes from the prefill at the full r; 0 after the stop).
    ``exit_values``: the exit criterion's value at the step each token stopped (adaptive exit
    only). ``logits`` [batch, max_new_tokens, vocab] with ``return_logits=True``. ``texts``: each
    row's completion decoded by the ``tokenizer`` of the call (special tokens skipped, cut before
    the stop token); None without one. ``stats``: counts of the call (``core_steps``; with
    adaptive exit ``row_utilization``; speculative acceptance; depth-continuous ``iterations``,
    ``boundary_passes``, ``prefills``) and ``passes``, how often each group of weights
    (prelude, core, coda with the head) was read after the first tokens, whatever the rows:
    what decoding costs where weight reads bound it.
    """

    tokens: np.ndarray
    steps: np.ndarray
    lengths: np.ndarray
    exit_values: np.ndarray | None
    logits: np.ndarray | None
    cache_bytes: int
    num_slots: int
    stats: dict[str, Any]
    texts: list[str] | None = None

    def rows(self) -> list[list[int]]:
        """Each row's generated tokens up to and including its stop token."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    @property
    def mean_steps(self) -> float:
        """Mean core iterations per generated token (over real tokens of all rows)."""
        mask = np.arange(self.steps.shape[1])[None] < self.lengths[:, None]
        return float(self.steps[mask].mean()) if mask.any() else 0.0


def _finish(raw: dict[str, jax.Array], plan: Plan) -> GenerateOutput:
    """Trim to max_new_tokens, cut each row after its stop token, move to NumPy."""
    raw = sharding.to_host(raw)
    n_new = plan.max_new_tokens
    num_generated = int(raw["num_generated"])
    tokens = np.asarray(raw["tokens"])[:, :n_new].copy()
    steps = np.asarray(raw["steps"])[:, :n_new].copy()
    lengths = np.full((plan.batch,), min(num_generated, n_new), np.int64)
    if plan.stop_tokens:
        is_stop = np.isin(tokens, plan.stop_tokens) & (np.arange(n_new)[None] < lengths[:, None])
        first = np.where(is_stop.any(1), is_stop.argmax(1) + 1, lengths)
        lengths = np.minimum(lengths, first)
    after = np.arange(n_new)[None] >= lengths[:, None]
    tokens[after] = PAD_ID
    steps[after] = 0
    exit_values = None
    if plan.exit is not None:
        exit_values = np.asarray(raw["exit_values"])[:, :n_new].copy()
        exit_values[after] = np.nan
    stats = {"core_steps": float(raw["core_steps"]) if plan.speculative else float(steps.sum())}
    if plan.exit is not None and n_new > 1:
        # The share of row-iterations that ran a step: each token's loop lasts as long as its
        # slowest row (the decoded tokens only; the prefill never exits).
        longest = steps[:, 1:].max(0).sum()
        stats["row_utilization"] = float(steps[:, 1:].sum()) / max(plan.batch * longest, 1)
    if plan.speculative is None:
        stats["passes"] = _lockstep_passes(np.asarray(raw["steps"])[:, 1:num_generated], plan)
    else:
        rounds = max(int(raw["rounds"]), 1)
        stats.update(accepted_drafts=int(raw["accepted_drafts"]), rounds=int(raw["rounds"]),
                     acceptance_rate=int(raw["accepted_drafts"]) /
                     (rounds * plan.speculative.num_draft))
    logits = None
    if plan.return_logits:
        logits = np.asarray(raw["logits"])[:, :n_new]
    return GenerateOutput(tokens=tokens, steps=steps, lengths=lengths, exit_values=exit_values,
                          logits=logits, cache_bytes=plan_cache_bytes(plan),
                          num_slots=plan.num_slots, stats=stats)


def _lockstep_passes(steps_bn: np.ndarray, plan: Plan) -> dict[str, int]:
    """Passes over each group of weights after the first token, of any number of rows: per
    token step one prelude, as many core steps as its slowest row ran (``steps_bn`` [batch,
    token steps]: a row that has stopped runs none under adaptive exit, every one at fixed r)
    and one coda with the head, plus one at each check of a distribution criterion."""
    longest_n = steps_bn.max(0) if steps_bn.size else np.zeros((0,), np.int64)
    codas = len(longest_n)
    if plan.exit is not None and plan.exit.needs_logits:
        codas += int((longest_n // plan.exit.check_every).sum())
    return {"prelude": len(longest_n), "core": int(longest_n.sum()), "coda": codas}


def _place(params: Params, cfg: ModelConfig, prompt_bt: np.ndarray, pad_b: np.ndarray,
           mesh: jax.sharding.Mesh | None) -> tuple[Params, jax.Array, jax.Array]:
    """Params by the training rules, the batch over "data" (replicated if it does not divide)."""
    if mesh is None:  # NumPy arrays go to the program as they are (cheaper than a jnp.asarray)
        return params, prompt_bt, pad_b
    params = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    spec = sharding.batch_spec(mesh)
    if prompt_bt.shape[0] % sharding.data_parallel_size(mesh):
        spec = PartitionSpec()  # a batch that does not divide stays replicated
    return (params, jax.device_put(prompt_bt, NamedSharding(mesh, spec)),
            jax.device_put(pad_b, NamedSharding(mesh, PartitionSpec(*spec[:1]))))


@functools.cache
def _default_key() -> jax.Array:
    """The key of greedy runs from the zero state, which draw nothing (made once: a key costs a
    dispatch, a noticeable part of a short generation's time)."""
    return jax.random.key(0)


def generate(params: Params, cfg: ModelConfig, prompt_tokens: Any, *, max_new_tokens: int,
             num_steps: int, exit: ExitConfig | str | None = None,
             cache_budget: int | None = None, continuous_cot: bool = False,
             speculative: SpeculativeConfig | bool | None = None, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             stop_tokens: Sequence[int] | None = None, key: jax.Array | None = None,
             prompt_lengths: Any = None, init_scale: float = 0.0, return_logits: bool = False,
             thoughts: ThoughtConfig | None = None, prompt_len: int | None = None,
             mesh: jax.sharding.Mesh | None = None, tokenizer: "Tokenizer | None" = None,
             bos: bool | None = None, continuous_batching: bool = False,
             batch_size: int | None = None, boundary_wait: int | None = None,
             stage_rows: int | None = None) -> GenerateOutput:
    """Generate ``max_new_tokens`` tokens after each prompt with ``num_steps`` core iterations.

    - ``prompt_tokens``: a list of token-id lists (lengths may differ), or a padded array with
      ``prompt_lengths``; with a ``tokenizer``, texts too (a string, or strings among the id
      lists), each encoded as ``tokenizer.prompt(text, bos=bos)`` (None: a BOS in front when
      the tokenizer has one, as `rdlm prepare` starts every document).
    - ``tokenizer`` (`rdlm.data.tokenizer.Tokenizer`): encodes text prompts, stops at its
      end-of-text / end-of-turn ids unless ``stop_tokens`` is given, and decodes every row's
      completion into ``out.texts``.
    - ``exit``: adaptive exit per token and row, an `ExitConfig` or ``"kl"``, ``"kl:5e-4"``,
      ``"argmax-stability:3"`` …; the cap is ``num_steps``. The prompt never exits early.
    - ``cache_budget``: recurrence slots per core layer (step i uses slot i mod budget); None keeps
      one slot per step. Fix it to compile once for every ``num_steps``.
    - ``continuous_cot``: each generated token starts from the previous token's final state.
    - ``speculative``: a `SpeculativeConfig` (or True for the defaults).
    - ``temperature`` 0 is greedy; otherwise ``key`` is required; ``top_k``/``top_p``/``min_p``
      filter the distribution. ``stop_tokens`` end a row (the stop token is kept); None: the
      tokenizer's stop ids, or none without a tokenizer.
    - ``init_scale``: 0 (default) starts every token from the zero state (deterministic); a
      positive value draws s_0 from ``key`` as in training.
    - ``thoughts``: prompt positions holding ``thoughts.token_id`` are continuous thoughts, each
      the previous position's last hidden state (`ThoughtConfig`), computed once into the cache.
    - ``prompt_len``: left-pad every prompt to this length (default: the longest); fix it to
      compile once for batches whose longest prompts differ.
    - ``mesh``: shard params with `rdlm.runtime.sharding.param_shardings` and the batch over "data";
      under ``continuous_batching``, each data-parallel group ("data" × "fsdp") works through
      its own consecutive share of the prompts on ``batch_size`` ÷ groups rows, the weights
      split over the group's "tensor" devices (whole on each when "tensor" is 1). A mesh may
      span several processes (hosts): each calls `generate` with the same prompts, and each
      gets every row.
    - ``continuous_batching``: depth-continuous batching (`rdlm.generation.continuous`): each of
      ``batch_size`` rows (default: one per prompt) runs its own token at its own iteration, a row
      whose token exits goes on to its next token at once, and a row whose sequence is done takes
      the next prompt. Outputs come in prompt order; one compilation serves every r and exit
      threshold. ``prompt_len`` defaults to a power-of-two bucket of the longest prompt.
      ``boundary_wait``: row-iterations that rows whose token is done wait, in all, so that
      their coda, sampling and next prelude run in one pass (under a distribution criterion,
      whose check ran the coda: their next prelude; None: `default_boundary_wait`, about one
      pass's cost; 0: each row at once). ``stage_rows``: prompts prefilled together, ahead of
      the rows that take them (None: `rdlm.generation.plan.default_stage_rows`, a whole batch
      for short prompts, fewer for long ones); fewer rows make a smaller staging cache.
    """
    prompt_tokens = encode_texts(prompt_tokens, tokenizer, bos, cfg)
    if stop_tokens is None:
        stop_tokens = tokenizer.stop_ids if tokenizer is not None else ()
    rows = prompt_rows(prompt_tokens, prompt_lengths, cfg)
    sampling = SamplingConfig(temperature=float(temperature), top_k=top_k, top_p=top_p,
                              min_p=min_p)
    if key is None and (not sampling.greedy or init_scale != 0):
        raise ValueError("sampling with temperature > 0 or a random initial state "
                         "(init_scale > 0) needs key=jax.random.key(...).")
    if continuous_batching and prompt_len is None:
        prompt_len = prompt_bucket(max(len(r) for r in rows), max_new_tokens, cfg.max_seq_len)
    elif not continuous_batching and any(option is not None for option in
                                         (batch_size, boundary_wait, stage_rows)):
        raise ValueError("batch_size, boundary_wait and stage_rows are options of "
                         "continuous_batching=True; without it every prompt is one row of the "
                         "batch, in lockstep.")
    plan = make_plan(cfg, rows, max_new_tokens=max_new_tokens, num_steps=num_steps, exit=exit,
                     cache_budget=cache_budget, continuous_cot=continuous_cot,
                     speculative=speculative, sampling=sampling, stop_tokens=stop_tokens,
                     init_scale=init_scale, return_logits=return_logits, thoughts=thoughts,
                     prompt_len=prompt_len)
    key = _default_key() if key is None else key
    if continuous_batching:
        threshold = None if plan.exit is None else plan.exit.value
        shares = group_shares(len(rows), 1 if mesh is None else sharding.data_parallel_size(mesh))
        if batch_size is not None and mesh is not None:
            if batch_size % len(shares):
                raise ValueError(f"batch_size={batch_size} rows must divide among the mesh's "
                                 f"{len(shares)} data-parallel groups (data × fsdp) under "
                                 "continuous_batching.")
            batch_size //= len(shares)
        plan = continuous_plan(plan, len(shares[0]), batch_size, stage_rows)
        if boundary_wait is None:
            boundary_wait = default_boundary_wait(cfg, plan.batch, plan.exit)
        elif not isinstance(boundary_wait, int) or boundary_wait < 0:
            raise ValueError(f"boundary_wait={boundary_wait!r} must be a whole number of "
                             "row-iterations, 0 or more.")
        out = _generate_continuous(params, plan, rows, shares, num_steps, threshold,
                                   boundary_wait, key, mesh)
        return with_texts(out, tokenizer, plan.stop_tokens)
    prompt_bt, pad_b = left_pad(rows, plan.prompt_len)
    params, prompt_bt, pad_b = _place(params, cfg, prompt_bt, pad_b, mesh)
    plan = dataclasses.replace(plan, mesh=mesh)
    raw = generate_jit(params, prompt_bt, pad_b, np.int32(num_steps), key, plan=plan)
    return with_texts(_finish(raw, plan), tokenizer, plan.stop_tokens)


def group_shares(num_prompts: int, groups: int) -> list[range]:
    """The prompts each data-parallel group works through under continuous batching:
    consecutive runs, as even as they come (a group may get none when prompts are fewer)."""
    per = -(-num_prompts // groups)
    return [range(min(g * per, num_prompts), min((g + 1) * per, num_prompts))
            for g in range(groups)]


def _queue(plan: Plan, rows: list[list[int]], share: range) -> Queue:
    """One group's queue: its share of the prompts, right-padded to the plan's queue."""
    queue_qt = np.full((plan.queue, plan.prompt_len), PAD_ID, np.int32)
    lengths_q = np.ones((plan.queue,), np.int32)  # padding slots: staged at most, never taken
    for i, index in enumerate(share):
        queue_qt[i, :len(rows[index])] = rows[index]
        lengths_q[i] = len(rows[index])
    return Queue(queue_qt, lengths_q, np.int32(len(share)), np.int32(share.start))


def _generate_continuous(params: Params, plan: Plan, rows: list[list[int]],
                         shares: list[range], num_steps: int, threshold: float | None,
                         boundary_wait: int, key: jax.Array, mesh: jax.sharding.Mesh | None
                         ) -> GenerateOutput:
    """The depth-continuous program over each data-parallel group's share of the prompts (one
    device without a mesh; within a group the weights split over "tensor"), outputs in prompt
    order. Stats: ``iterations`` of the longest group, passes and row-iterations summed over
    groups."""
    scalars = (np.int32(num_steps), np.float32(0.0 if threshold is None else threshold),
               np.int32(boundary_wait), key)
    queues = [_queue(plan, rows, share) for share in shares]
    if mesh is None:  # one group, without the group axis
        raw = jax.tree.map(lambda x: x[None], sharding.to_host(
            continuous_jit(params, queues[0], *scalars, plan=plan)))
    else:
        params = jax.device_put(params, sharding.param_shardings(plan.cfg, mesh,
                                                                 sharding.GROUP_RULES))
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *queues)
        raw = sharding.to_host(continuous_on_groups_jit(params, stacked, *scalars, plan=plan,
                                                        mesh=mesh))

    def joined(name: str) -> np.ndarray:  # every group's real prompts, in prompt order
        return np.concatenate([np.asarray(raw[name])[g, :len(share)]
                               for g, share in enumerate(shares)])

    n_new = plan.max_new_tokens
    lengths = joined("lengths").astype(np.int64)
    tokens, steps = joined("tokens")[:, :n_new], joined("steps")[:, :n_new]
    exit_values = joined("exit_values")[:, :n_new] if plan.exit is not None else None
    logits = joined("logits")[:, :n_new] if plan.return_logits else None
    total = {name: int(np.sum(raw[name])) for name in
             ("iterations", "busy", "boundaries", "prefills", "prelude_passes", "coda_passes")}
    stats = {"core_steps": float(steps.sum()), "iterations": int(np.max(raw["iterations"])),
             "row_utilization": total["busy"] / max(total["iterations"] * plan.batch, 1),
             "boundary_passes": total["boundaries"], "prefills": total["prefills"],
             "passes": {"prelude": total["prelude_passes"], "core": total["iterations"],
                        "coda": total["coda_passes"]}}
    return GenerateOutput(tokens=tokens, steps=steps, lengths=lengths, exit_values=exit_values,
                          logits=logits, cache_bytes=plan_cache_bytes(plan) * len(shares),
                          num_slots=plan.num_slots, stats=stats)


def _is_text(prompt: Any) -> bool:
    return isinstance(prompt, str)


def encode_texts(prompts: Any, tokenizer: "Tokenizer | None", bos: bool | None,
                 cfg: ModelConfig) -> Any:
    """Text prompts (one string, or strings among the id lists) as id lists; anything else as
    it is. Raises ValueError for text without a tokenizer or a tokenizer larger than the model's
    vocabulary."""
    if _is_text(prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not any(_is_text(p) for p in prompts):
        return prompts
    if tokenizer is None:
        raise ValueError("prompts are text but no tokenizer was given: pass tokenizer="
                         "rdlm.data.tokenizer.load_tokenizer(...) (a built-in name or a "
                         "tokenizer.json), or token-id lists.")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens, "
                         f"more than the model's vocab_size={cfg.vocab_size}.")
    return [tokenizer.prompt(p, bos=bos) if _is_text(p) else p for p in prompts]


def with_texts(out: GenerateOutput, tokenizer: "Tokenizer | None",
               stop_tokens: Sequence[int]) -> GenerateOutput:
    """``out`` with each row's completion decoded (cut before its stop token, special tokens
    skipped); unchanged without a tokenizer."""
    if tokenizer is None:
        return out
    texts = []
    for ids in out.rows():
        if ids and ids[-1] in stop_tokens:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return dataclasses.replace(out, texts=texts)

