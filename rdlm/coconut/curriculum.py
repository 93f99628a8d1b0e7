"""The continuous-thought curriculum (SPEC §2): its configuration, stages, batches and training.

Stage 0 is the full chain of thought; stage k replaces the first k reasoning steps by k·c
latents; the final stage drops every language step. Training is the shared loop
(`rdlm.train.train`) with two parts from here: `CoconutObjective`, the continuous-thought loss
with its own depth policy, and a `StageSchedule` that resets the optimizer state at every stage
change. Batches are pure functions of the step, so a resumed run sees the same data.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdlm.coconut.thoughts import Batch, Depth, coconut_loss, latent_ordinals
from rdlm.config import Config, ConfigError, ModelConfig
from rdlm.config_files import config_data, from_dict
from rdlm.data.render import prompt_tokens, render
from rdlm.data.tasks import Example, example_at, make_task
from rdlm.data.tokenizer import Tokenizer, load_tokenizer
from rdlm.runtime import checkpoint as ckpt_lib
from rdlm.runtime import storage
from rdlm.runtime.distributed import maybe_initialize_distributed
from rdlm.train.loop import train
from rdlm.train.metrics import read_metrics
from rdlm.train.stages import StageSchedule
from rdlm.train.stages import is_stage_start, stage_at  # noqa: F401  (the plan's arithmetic, here too)
from rdlm.train.state import TrainState
from rdlm.train.step import FORWARD_PASSES, DepthPolicy

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
    data = config_data(path, overrides)
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
# Training: a loss and a stage schedule on the shared train loop (`rdlm.train.train`).


def eval_depth(cfg: Config, cc: CoconutConfig) -> Depth:
    r = cc.eval_num_steps or cc.train_num_steps or cfg.model.mean_recurrence
    return Depth(jnp.int32(r), jnp.int32(0), 0)


@dataclasses.dataclass(frozen=True)
class CoconutObjective:
    """`coconut_loss` as the train step's objective: (params, batch, n_no_grad, n_grad, key) →
    (loss, metrics). Frozen, so hashable (the compiled step is memoised on it), and holding only
    what the loss depends on. ``depth`` is its own recurrence policy (`coconut_objective`)."""

    model: ModelConfig
    latent_id: int
    max_latents: int
    init_scale: float
    substitute: bool  # False: <latent> stays an ordinary token (the pause baseline)
    shift_sees_thoughts: bool
    depth: DepthPolicy

    def __call__(self, params: Any, batch: Batch, n_no_grad: jax.Array, n_grad: jax.Array,
                 key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        depth = Depth(n_no_grad, n_grad, self.depth.max_grad)
        loss, metrics = coconut_loss(params, batch, self.model, latent_id=self.latent_id,
                                     max_latents=self.max_latents, depth=depth, key=key,
                                     init_scale=self.init_scale, substitute=self.substitute,
                                     shift_sees_thoughts=self.shift_sees_thoughts)
        return loss, {**metrics, FORWARD_PASSES: self.forward_passes(batch["inputs"])}

    def forward_passes(self, tokens_bt: jax.Array) -> jax.Array:
        """Full passes of the model per step: one per latent ordinal in the batch (the surplus
        passes of the scan are skipped), then one for the logits."""
        if not self.substitute or self.max_latents == 0:
            return jnp.float32(1)
        thoughts = jnp.max(latent_ordinals(tokens_bt, self.latent_id)) + 1
        return (jnp.clip(thoughts, 0, self.max_latents) + 1).astype(jnp.float32)


def coconut_objective(cfg: Config, cc: CoconutConfig, latent_id: int) -> CoconutObjective:
    """The objective of a run. A fixed ``coconut.train_num_steps`` = r runs r steps, all with
    gradient (a static scan of length r); 0 samples the depth as `rdlm train` does, around
    ``model.mean_recurrence`` with backprop depth ``model.backprop_depth``."""
    r = cc.train_num_steps
    depth = (DepthPolicy(r, r, fixed=True) if r
             else DepthPolicy(cfg.model.mean_recurrence, cfg.model.backprop_depth))
    return CoconutObjective(cfg.model, latent_id, cc.max_latents, float(cc.init_scale),
                            substitute=cc.method == "coconut",
                            shift_sees_thoughts=cc.shift_sees_thoughts, depth=depth)


def training_examples(cfg: Config, cc: CoconutConfig) -> list[Example]:
    task = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
    return [example_at(task, "train", i, cfg.seed) for i in range(cc.num_train_examples)]


def steps_per_stage(cfg: Config, cc: CoconutConfig) -> int:
    if cc.epochs_per_stage:
        return max(1, math.ceil(cc.epochs_per_stage * cc.num_train_examples / cfg.train.batch_size))
    return cc.steps_per_stage


class CurriculumBatches:
    """The curriculum's batches in step order: the train loop's data iterator. A batch is a pure
    function of (step, stage, seed), so the iterator's whole state is the next step; the loop
    saves it with every checkpoint."""

    def __init__(self, examples: Sequence[Example], tok: Tokenizer, cc: CoconutConfig,
                 schedule: StageSchedule, batch_size: int, seq_len: int, seed: int):
        self.examples, self.tok, self.cc, self.schedule = examples, tok, cc, schedule
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.step = 0

    def __iter__(self) -> "CurriculumBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = curriculum_batch(self.examples, self.tok, self.cc,
                                 self.schedule.stage_at(self.step), self.step, self.batch_size,
                                 self.seq_len, self.seed)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


@dataclasses.dataclass
class CoconutResult:
    state: TrainState
    history: list[dict[str, Any]]  # every step of the run, earlier calls included
    plan: list[tuple[int, int]]  # [(stage, steps)]
    status: str  # as `rdlm.train.TrainResult.status`

    @property
    def params(self) -> Any:
        return self.state.params

    @property
    def train_seconds(self) -> float:
        """Step time of the whole run over all its calls (compilation included; checkpoint
        writes excluded)."""
        return float(sum(h.get("step_time_s", 0.0) for h in self.history))


def run_config(cfg: Config, schedule: StageSchedule) -> Config:
    """``cfg`` as the shared loop runs it: as long as the stage plan, and without the loop's
    held-out eval and latent telemetry, which run the plain forward with ``<latent>`` as a token
    (`rdlm.coconut.evaluate_method` evaluates a continuous-thought model)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, steps=schedule.total_steps, eval_every=0, telemetry_every=0))


def train_coconut(cfg: Config, cc: CoconutConfig, *, stop_after: int | None = None,
                  log: Callable[[str], None] | None = None) -> CoconutResult:
    """Run (or resume) the whole curriculum in ``cfg.train.run_dir`` on `rdlm.train.train`.

    The loop brings its checkpoints (every ``train.checkpoint_every`` steps and at every stage
    end, with the stage in their meta), metrics.jsonl and TensorBoard logs, tokens/s and MFU, the
    NaN guard on loss and gradient norm, micro-batching and SIGTERM saves. The optimizer state is
    reset at every stage change, also when a resumed run starts exactly on a stage boundary.
    ``train.steps`` is set from the stage plan. ``stop_after`` returns after that many steps of
    this call without saving, as a kill would (tests). ``log`` takes the messages and progress
    lines (default: stdout, with a progress bar on a terminal). The returned ``history`` (from
    ``run_dir/metrics.jsonl``) covers the whole run, earlier calls included.
    """
    maybe_initialize_distributed(cfg.mesh)  # mesh.cpu_devices: before the first device query
    if jax.process_count() > 1:
        raise ConfigError("rdlm coconut runs in one process (every process would build the same "
                          "global batch); use a single host, or `python -m rdlm train` for "
                          "multi-host runs.")
    budget = steps_per_stage(cfg, cc)
    if budget == 0:
        raise ConfigError("coconut.steps_per_stage=0 (with coconut.epochs_per_stage=0) leaves "
                          "nothing to train; set one of them > 0.")
    schedule = StageSchedule(tuple(stage_plan(cc, budget)))
    cfg = run_config(cfg, schedule)
    # A folder or a bucket, checked before the resume point is read from it.
    storage.check_access(cfg.train.run_dir, "train.run_dir")
    run_dir = storage.as_path(cfg.train.run_dir)
    tok = load_tokenizer(cfg.data.tokenizer)
    data = CurriculumBatches(training_examples(cfg, cc), tok, cc, schedule,
                             cfg.train.batch_size, cfg.train.seq_len, cfg.seed)
    # The position follows from the step the run resumes at, so that a checkpoint without the
    # iterator's state resumes with the right batches too; a saved state says the same.
    data.set_state({"step": ckpt_lib.finished_step(run_dir) or 0})
    result = train(cfg, data_iterator=data, loss_fn=coconut_objective(cfg, cc, tok.latent_id),
                   schedule=schedule, stop_after=stop_after, printer=log)
    history = read_metrics(run_dir / "metrics.jsonl")
    return CoconutResult(result.state, history, list(schedule.plan), result.status)
