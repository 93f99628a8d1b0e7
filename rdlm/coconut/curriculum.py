"""The continuous-thought curriculum (SPEC §2): its configuration, stages, batches and trainer.

Stage 0 is the full chain of thought; stage k replaces the first k reasoning steps by k·c
latents; the final stage drops every language step. The optimizer state is reset at every stage
change. Batches are pure functions of the step, so a resumed run sees the same data.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from rdlm.coconut.thoughts import Batch, Depth, coconut_loss
from rdlm.config import Config, ConfigError, DataConfig, from_dict
from rdlm.data.render import prompt_tokens, render
from rdlm.data.tasks import Example, example_at, make_task
from rdlm.data.tokenizer import Tokenizer, load_tokenizer
from rdlm.model.recurrence import sample_depth
from rdlm.runtime import checkpoint as ckpt_lib
from rdlm.runtime import sharding as shard_lib
from rdlm.train.metrics import truncate_jsonl
from rdlm.train.optim import make_optimizer
from rdlm.train.state import TrainState, abstract_state, init_state, state_shardings
from rdlm.train.step import check_layout, step_key

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
        history = truncate_jsonl(run_dir / HISTORY_FILE, start)
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
