"""Frozen, validated configuration: dataclasses and presets (`rdlm.config_files` reads YAML
files and dotted overrides into them).

Every section is a frozen dataclass, so a config is hashable and can be a static argument of
`jax.jit`. Values are checked where they enter (`__post_init__`): a bad value raises `ConfigError`
naming the field, the value and what would be valid; an unknown key names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Mapping, Sequence

from rdlm.errors import ConfigError


def _require(ok: bool, field: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is invalid: {valid}.")


def did_you_mean(key: str, valid: Sequence[str] | Mapping[str, Any]) -> str:
    """An error message's suffix naming the closest of ``valid`` to ``key`` (or nothing)."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


DTYPES = ("float32", "bfloat16")
# Names owned by layers above this one (`rdlm.data.tasks`, `rdlm.generation.exits`), spelled out
# here because the config layer imports nothing above it; tests check that the lists agree.
TASK_NAMES = ("chains", "addition", "prosqa", "prontoqa")
EXIT_CRITERIA = ("kl", "minp-kl", "entropy-diff", "latent-diff", "cosine", "argmax-stability")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a recurrent-depth LM: prelude blocks, a core iterated r times, coda blocks."""

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    mlp_dim: int = 352
    n_prelude: int = 1  # blocks before the recurrence
    n_core: int = 2  # blocks inside one recurrence step
    n_coda: int = 1  # blocks after the recurrence
    max_seq_len: int = 256  # longest sequence (positions) the model is used with
    rope_base: float = 50_000.0
    norm_eps: float = 1e-6
    qk_bias: bool = True  # learned (2, 1, heads, head_dim) bias added to q and k before RoPE
    mean_recurrence: int = 8  # training mean of r; also sets the "takase" out-projection scale
    backprop_depth: int = 4  # k: at most this many steps get gradient (truncated backprop)
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: bool = True  # rematerialise in the backward pass (false: store every activation)
    # What the backward pass recomputes instead of storing, when `remat` is true:
    #   core (Huginn's "activation checkpointing per iteration"): each gradient-carrying core step
    #     from its input state; prelude and coda blocks keep their activations
    #   full: as core, and each prelude and coda block from its input
    #   save_dots: as full, but keeping the outputs of the weight matmuls
    #   save_attention_out: as full, but keeping each attention's output (and its softmax
    #     statistics where the kernel has them), so the attention itself is not recomputed
    #   save_qkv_attention_out: as save_attention_out, also keeping q, k and v (after RoPE)
    #   none: nothing (the same as remat: false)
    remat_policy: str = "core"
    REMAT_POLICIES: typing.ClassVar[tuple[str, ...]] = (
        "core", "full", "save_dots", "save_attention_out", "save_qkv_attention_out", "none")
    # Extension, not in Huginn (0 = off): add the embeddings of the previous `token_shift` visible
    # tokens, each through its own d×d matrix (initialised to zero), to a token's input embedding.
    # A token then knows its neighbours before any attention, so binding "c=b" at one position
    # needs no previous-token head; small models learn key→value lookups far sooner.
    token_shift: int = 0
    # Extension, not in Huginn ("normal" = Huginn): "identity" starts the adapter as [I; I], so
    # that x = s + e at init — each step then continues the previous step's residual stream
    # instead of reading it through a random matrix, and a value carried in the state looks like
    # the same value in e. Still trained; only the starting point differs. "embedding" starts it
    # as [0; I], x = e whatever the state: a retrofitted model (`rdlm convert llama-to-rdlm`) then
    # computes exactly its original network at r = 1, from any s_0.
    adapter_init: str = "normal"
    # The block that prelude, core and coda are made of:
    #   huginn (SPEC §1): sandwich norms, fused q/k/v with `qk_bias`, interleaved RoPE, embeddings
    #     scaled by sqrt(d_model), the final norm before and after the coda
    #   llama: pre-norm blocks, grouped-query attention (`n_kv_heads`), rotate-half RoPE with
    #     optional scaling, optional q/k/v/out biases (`attn_bias`), no embedding scale, the final
    #     norm after the coda only: what Llama-family checkpoints compute, so that
    #     `rdlm convert llama-to-rdlm` can put their layers into prelude, core and coda
    block: str = "huginn"
    BLOCKS: typing.ClassVar[tuple[str, ...]] = ("huginn", "llama")
    n_kv_heads: int = 0  # key/value heads of grouped-query attention (0: n_heads); llama only
    attn_bias: bool = False  # biases on the q, k, v and output projections; llama only
    tie_embeddings: bool = True  # the embedding is the output head (false: a separate lm_head)
    # RoPE frequency scaling, as in a checkpoint's `rope_scaling`: none; linear (every frequency
    # divided by the factor); llama3 (low frequencies divided, high kept, a smooth ramp between,
    # set by the two freq factors and the pretraining context length).
    rope_scaling: str = "none"
    ROPE_SCALINGS: typing.ClassVar[tuple[str, ...]] = ("none", "linear", "llama3")
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "mlp_dim", "n_core", "max_seq_len",
                     "mean_recurrence", "backprop_depth"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"model.{name}", value,
                     "must be a positive integer")
        for name in ("n_prelude", "n_coda"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, f"model.{name}", value,
                     "must be an integer >= 0")
        _require(self.d_model % self.n_heads == 0, "model.d_model", self.d_model,
                 f"must be divisible by model.n_heads={self.n_heads}")
        _require(self.head_dim % 2 == 0, "model.d_model", self.d_model,
                 f"d_model / n_heads = {self.head_dim} must be even for interleaved RoPE")
        _require(self.rope_base > 1, "model.rope_base", self.rope_base, "must be > 1")
        _require(0 < self.norm_eps < 1, "model.norm_eps", self.norm_eps, "must be in (0, 1)")
        _require(self.dtype in DTYPES, "model.dtype", self.dtype, f"must be one of {DTYPES}")
        _require(self.adapter_init in ("normal", "identity", "embedding"), "model.adapter_init",
                 self.adapter_init,
                 "must be 'normal' (Huginn), 'identity' ([I; I]) or 'embedding' ([0; I])")
        _require(isinstance(self.token_shift, int) and 0 <= self.token_shift <= 8,
                 "model.token_shift", self.token_shift, "must be an integer in [0, 8] (0 = off)")
        _require(self.remat_policy in self.REMAT_POLICIES, "model.remat_policy",
                 self.remat_policy, f"must be one of {self.REMAT_POLICIES}")
        _require(self.block in self.BLOCKS, "model.block", self.block,
                 f"must be one of {self.BLOCKS}")
        _require(isinstance(self.n_kv_heads, int) and self.n_kv_heads >= 0
                 and (self.n_kv_heads == 0 or self.n_heads % self.n_kv_heads == 0),
                 "model.n_kv_heads", self.n_kv_heads,
                 f"must be 0 (= n_heads) or a divisor of model.n_heads={self.n_heads}")
        if self.block == "huginn":
            _require(self.kv_heads == self.n_heads, "model.n_kv_heads", self.n_kv_heads,
                     "grouped-query attention needs model.block=llama (Huginn's block has one "
                     "key/value head per query head); set it to 0")
            _require(not self.attn_bias, "model.attn_bias", self.attn_bias,
                     "needs model.block=llama (Huginn's block has q/k biases only: qk_bias)")
        else:
            _require(not self.qk_bias, "model.qk_bias", self.qk_bias,
                     "is the Huginn block's q/k bias; the llama block takes model.attn_bias "
                     "instead: set model.qk_bias=false")
        _require(self.rope_scaling in self.ROPE_SCALINGS, "model.rope_scaling", self.rope_scaling,
                 f"must be one of {self.ROPE_SCALINGS}")
        _require(self.rope_scaling_factor > 0, "model.rope_scaling_factor",
                 self.rope_scaling_factor, "must be > 0")
        _require(0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
                 "model.rope_low_freq_factor", self.rope_low_freq_factor,
                 f"must be > 0 and < model.rope_high_freq_factor={self.rope_high_freq_factor}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or one per query head when it is 0."""
        return self.n_kv_heads or self.n_heads

    @property
    def effective_depth(self) -> float:
        """L_eff of the "takase" init: prelude + core * mean recurrence + coda."""
        return self.n_prelude + self.n_core * self.mean_recurrence + self.n_coda

    @property
    def init_std(self) -> float:
        return math.sqrt(2.0 / (5.0 * self.d_model))


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Small enough that a test compiles and runs in a second on one CPU core.
    "tiny": ModelConfig(vocab_size=64, d_model=32, n_heads=4, mlp_dim=64, n_prelude=1, n_core=2,
                        n_coda=1, max_seq_len=64, mean_recurrence=4, backprop_depth=2),
    # Huginn-0125 (SPEC §1): 3,564,976,800 parameters.
    "huginn-3.5b": ModelConfig(vocab_size=65_536, d_model=5_280, n_heads=55, mlp_dim=17_920,
                               n_prelude=2, n_core=4, n_coda=2, max_seq_len=4_096,
                               rope_base=50_000.0, norm_eps=1e-6, mean_recurrence=32,
                               backprop_depth=8, dtype="bfloat16"),
    # The benchmark shape (~28 M parameters).
    "bench-28m": ModelConfig(vocab_size=4_096, d_model=512, n_heads=8, mlp_dim=1_408, n_prelude=2,
                             n_core=4, n_coda=2, max_seq_len=256, mean_recurrence=8,
                             backprop_depth=4),
}


def model_preset(name: str, **changes: Any) -> ModelConfig:
    """A named `ModelConfig` ("tiny", "huginn-3.5b", "bench-28m"), optionally with fields changed."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}{did_you_mean(name, MODEL_PRESETS)}; "
                          f"presets: {sorted(MODEL_PRESETS)}.")
    return dataclasses.replace(MODEL_PRESETS[name], **changes)


# ---------------------------------------------------------------------------------------------
# Whole-run configuration.


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes of the named axes; -1 takes all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Multi-host start-up (`jax.distributed.initialize`): "auto" initialises when a coordinator is
    # given here or the cluster is auto-detectable (TPU pod, SLURM); "off" never does.
    distributed: str = "auto"
    coordinator_address: str = ""  # host:port of process 0, for clusters JAX cannot detect
    num_processes: int = 0  # with coordinator_address
    process_id: int = -1  # with coordinator_address
    # CPU-only runs: split the host into this many XLA devices, each taking a share of the batch
    # (0: JAX's default, one). XLA:CPU keeps fewer than two cores busy on one device's small
    # ops, so two devices on a 2-core machine shorten small models' steps (docs/performance.md).
    cpu_devices: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.cpu_devices, int) and self.cpu_devices >= 0, "mesh.cpu_devices",
                 self.cpu_devices, "must be an integer >= 0 (0 keeps JAX's default)")
        _require(self.distributed in ("auto", "off"), "mesh.distributed", self.distributed,
                 "must be 'auto' or 'off'")
        if self.coordinator_address:
            _require(self.num_processes >= 1, "mesh.num_processes", self.num_processes,
                     "must be >= 1 when mesh.coordinator_address is set")
            _require(0 <= self.process_id < self.num_processes, "mesh.process_id",
                     self.process_id, f"must be in [0, {self.num_processes}) when "
                     "mesh.coordinator_address is set")
        sizes = (self.data, self.fsdp, self.tensor)
        for name, value in zip(("data", "fsdp", "tensor"), sizes):
            _require(isinstance(value, int) and (value >= 1 or value == -1), f"mesh.{name}",
                     value, "must be a positive integer or -1 (all remaining devices)")
        _require(sizes.count(-1) <= 1, "mesh", sizes, "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging of a training run (owned by rdlm.train)."""

    steps: int = 1000
    batch_size: int = 8  # global sequences per optimizer step
    seq_len: int = 128
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many parts
    run_dir: str = "runs/default"
    init_from: str = ""  # params-only checkpoint (or run dir) to start a *new* run from
    # Resume from this complete checkpoint instead of the newest one, deleting the later ones
    # (e.g. to go back before a divergence); 0 = start afresh. -1: the newest checkpoint.
    resume_step: int = -1

    # Recurrence depth per step: "sampled" (Huginn: r ~ 1 + Poisson(LogNormal) with mean
    # model.mean_recurrence) or "fixed" (r = model.mean_recurrence every step: fixed-depth
    # baselines, e.g. r = 1 for a plain transformer with the same parameters).
    depth: str = "sampled"
    # Recurrence curriculum (0 = off): the mean r (or the fixed r) rises linearly from
    # recurrence_curriculum_start at step 0 to model.mean_recurrence at step
    # recurrence_curriculum_steps, rounded up to a whole number of steps, then stays there
    # (McLeish et al. 2025 retrofit pretrained models this way). backprop_depth is unchanged.
    recurrence_curriculum_steps: int = 0
    recurrence_curriculum_start: int = 1
    # Parts of the model whose parameters stay as they are (bitwise; the optimizer keeps no
    # moments for them); () trains everything. embeddings: wte (also the output head when
    # model.tie_embeddings) and token_shift; prelude; adapter: the core's input adapter; core: the
    # recurrent blocks; coda; head: the final norm ln_f and lm_head. Retrofitting a pretrained
    # model may train only the new adapter and core: [embeddings, prelude, coda, head].
    freeze: tuple[str, ...] = ()
    FREEZABLE: typing.ClassVar[tuple[str, ...]] = (
        "embeddings", "prelude", "adapter", "core", "coda", "head")
    # Scale of the random initial state s_0 in training (1 = Huginn's TruncNormal, 0 = zero state).
    init_scale: float = 1.0

    # Optimizer. "adamw": optax AdamW. "huginn": the Huginn-0125 recipe, Adam-atan2 (no eps) with
    # per-tensor update clipping; both use decoupled weight decay that skips norms and biases.
    optimizer: str = "adamw"
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8  # adamw only; atan2 needs none
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    update_clip: float = 1.0  # huginn: per-tensor RMS cap of the update; 0 disables

    # Schedule: linear warm-up, then "constant", "cosine" (to min_lr_ratio * lr at the last step)
    # or "trapezoid" (constant, then linear decay over the last decay_fraction of the steps).
    schedule: str = "constant"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    # Checkpoints: every checkpoint_every steps and at the end; keep the last keep_last plus every
    # keep_every-th step (0: none extra). Saves are asynchronous unless async_checkpoint is false.
    checkpoint_every: int = 500
    keep_last: int = 3
    keep_every: int = 0
    async_checkpoint: bool = True

    # Observability and guards.
    log_every: int = 10
    eval_every: int = 0  # 0: no periodic eval; else eval loss at each r in eval_steps
    eval_batches: int = 2
    eval_steps: tuple[int, ...] = (1, 4, 8, 16, 32)
    telemetry_every: int = 0  # latent-state telemetry (convergence, norm, token correlation)
    max_bad_steps: int = 5  # non-finite loss/grad: skip the step; stop after this many in a row
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look up the device table
    progress: str = "auto"  # "bar" (tqdm), "lines", or "auto" (bar on a terminal)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "micro_batches", "keep_last", "log_every",
                     "eval_batches", "max_bad_steps"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"train.{name}", value,
                     "must be a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "keep_every", "eval_every",
                     "telemetry_every"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, f"train.{name}", value,
                     "must be an integer >= 0")
        _require(isinstance(self.resume_step, int) and self.resume_step >= -1,
                 "train.resume_step", self.resume_step,
                 "must be a checkpointed step, 0 (start afresh) or -1 (the newest checkpoint)")
        _require(self.batch_size % self.micro_batches == 0, "train.micro_batches",
                 self.micro_batches, f"must divide train.batch_size={self.batch_size}")
        _require(self.depth in ("sampled", "fixed"), "train.depth", self.depth,
                 "must be 'sampled' or 'fixed'")
        _require(isinstance(self.recurrence_curriculum_steps, int)
                 and self.recurrence_curriculum_steps >= 0, "train.recurrence_curriculum_steps",
                 self.recurrence_curriculum_steps, "must be an integer >= 0 (0 = off)")
        _require(isinstance(self.recurrence_curriculum_start, int)
                 and self.recurrence_curriculum_start >= 1, "train.recurrence_curriculum_start",
                 self.recurrence_curriculum_start, "must be a positive integer")
        _require(all(p in self.FREEZABLE for p in self.freeze), "train.freeze", self.freeze,
                 f"every entry must be one of {self.FREEZABLE}")
        _require(len(set(self.freeze)) < len(self.FREEZABLE), "train.freeze", self.freeze,
                 "leaves nothing to train")
        _require(self.optimizer in ("adamw", "huginn"), "train.optimizer", self.optimizer,
                 "must be 'adamw' or 'huginn'")
        _require(self.schedule in ("constant", "cosine", "trapezoid"), "train.schedule",
                 self.schedule, "must be 'constant', 'cosine' or 'trapezoid'")
        _require(self.progress in ("auto", "bar", "lines"), "train.progress", self.progress,
                 "must be 'auto', 'bar' or 'lines'")
        _require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"train.{name}", value, "must be in [0, 1)")
        for name in ("eps", "weight_decay", "grad_clip", "update_clip", "peak_flops",
                     "init_scale"):
            value = getattr(self, name)
            _require(value >= 0, f"train.{name}", value, "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio,
                 "must be in [0, 1]")
        _require(0 < self.decay_fraction <= 1, "train.decay_fraction", self.decay_fraction,
                 "must be in (0, 1]")
        _require(all(isinstance(r, int) and r >= 1 for r in self.eval_steps), "train.eval_steps",
                 self.eval_steps, "must be a list of positive integers")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training tokens come from and how they are batched (owned by rdlm.data).

    See docs/data.md. Token sources read ``paths`` (globs; ``{split}`` is replaced by the split).
    """

    source: str = "synthetic"  # synthetic | memmap | arrayrecord | parquet | gsm8k
    task: str = "chains"  # synthetic task: chains | addition | prosqa | prontoqa
    difficulty: int = 1  # task level 1 (learnable on a CPU) … 5 (the papers' setting)
    task_args: tuple[str, ...] = ()  # "knob=value" overrides of the task level, e.g. "max_hops=4"
    format: str = "nocot"  # how examples render: nocot | cot | coconut
    num_latent_steps: int = 0  # coconut: reasoning steps replaced by latents (k)
    latents_per_step: int = 1  # coconut: latents per replaced step (c)
    loss_on: str = "completion"  # completion (answer/reasoning tokens) | all (every token)
    paths: tuple[str, ...] = ()  # files or globs of a token/gsm8k source
    token_column: str = "tokens"  # parquet column holding token ids
    tokenizer: str = "chars"  # chars | ascii | path to a tokenizer.json
    # auto: slots for examples, windows for memmap, first_fit for record sources. slots: a fixed
    # number of examples per row (any process count resumes the same data order); first_fit /
    # concat: grain's streaming packers; none: one example per row, padded.
    packing: str = "auto"
    examples_per_row: int = 0  # slots packing: examples per row (0 = fit the longest of a sample)
    shuffle: bool = True
    shuffle_seed: int = 0
    num_examples: int = 1_000_000  # examples in one epoch of a synthetic split
    read_threads: int = 2  # grain read threads per process (order stays deterministic)
    prefetch_batches: int = 2  # batches built ahead in a background thread (0 = none)
    # Train every question of a context at once: a shared trunk plus one isolated branch per
    # question (chains task). Dense supervision; each branch computes what it would alone.
    branches: bool = False

    def __post_init__(self) -> None:
        sources = ("synthetic", "memmap", "arrayrecord", "parquet", "gsm8k")
        _require(self.source in sources, "data.source", self.source, f"must be one of {sources}")
        _require(self.task in TASK_NAMES, "data.task", self.task,
                 f"must be one of {TASK_NAMES}")
        _require(isinstance(self.difficulty, int) and 1 <= self.difficulty <= 5,
                 "data.difficulty", self.difficulty, "must be an integer in [1, 5]")
        formats = ("nocot", "cot", "coconut")
        _require(self.format in formats, "data.format", self.format, f"must be one of {formats}")
        _require(self.loss_on in ("completion", "all"), "data.loss_on", self.loss_on,
                 "must be 'completion' or 'all'")
        packings = ("auto", "slots", "first_fit", "concat", "none")
        _require(self.packing in packings, "data.packing", self.packing,
                 f"must be one of {packings}")
        _require(self.source == "synthetic" or len(self.paths) > 0, "data.paths", self.paths,
                 f"data.source={self.source!r} needs at least one file or glob")
        _require(bool(self.tokenizer), "data.tokenizer", self.tokenizer,
                 "must be 'chars', 'ascii' or a path to a tokenizer.json")
        for name in ("num_examples", "read_threads", "latents_per_step"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, f"data.{name}", value,
                     "must be a positive integer")
        if self.branches:
            _require(self.source == "synthetic" and self.task == "chains", "data.branches",
                     self.branches, "is supported for data.source=synthetic, data.task=chains")
            _require(self.format == "nocot", "data.branches", self.branches,
                     "needs data.format='nocot'")
        for name in ("num_latent_steps", "prefetch_batches", "examples_per_row"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 0, f"data.{name}", value,
                     "must be an integer >= 0")
        # The knobs' names, types and ranges belong to the task (`rdlm.data.tasks.make_task`, run
        # when the data pipeline is built and by `python -m rdlm train` first thing); here, the form.
        for item in self.task_args:
            _require(isinstance(item, str) and "=" in item and bool(item.partition("=")[0].strip()),
                     "data.task_args", item, "entries must look like knob=value, e.g. max_hops=4")


# The largest r generation and evaluation accept. Without a cache budget the KV cache keeps one
# slot per core step, so memory and time grow with r; this is 16x Huginn's training mean, past
# where any published curve still moves. Larger r is a typo more often than an experiment.
MAX_NUM_STEPS = 1024


def check_num_steps(value: Any, where: str = "num_steps") -> int:
    """``value`` as a number of core steps r in [1, MAX_NUM_STEPS], or `ConfigError`."""
    _require(isinstance(value, int) and not isinstance(value, bool)
             and 1 <= value <= MAX_NUM_STEPS, where, value,
             f"must be an integer in [1, {MAX_NUM_STEPS}] (rdlm.config.MAX_NUM_STEPS)")
    return value


def _check_exit(spec: str) -> None:
    """``criterion[:threshold]`` with a known criterion and a positive threshold."""
    name, _, raw = spec.partition(":")
    _require(name.strip() in EXIT_CRITERIA, "sample.exit", spec,
             f"the criterion must be one of {EXIT_CRITERIA}{did_you_mean(name, EXIT_CRITERIA)}")
    try:
        threshold = float(raw or 1)
    except ValueError:
        threshold = math.nan
    _require(math.isfinite(threshold) and threshold > 0, "sample.exit", spec,
             "the threshold after ':' must be a positive number, e.g. kl:1e-3")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Generation defaults for `python -m rdlm sample` (owned by rdlm.sample)."""

    num_steps: int = 32  # core iterations per token (the cap under adaptive exit)
    max_new_tokens: int = 64
    cache_budget: int | None = None  # recurrence slots per core layer; None: one per step
    exit: str | None = None  # adaptive exit "criterion[:threshold]", e.g. "kl:1e-3"
    continuous_cot: bool = False  # start each token from the previous token's final state
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        check_num_steps(self.num_steps, "sample.num_steps")
        _require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
                 "sample.max_new_tokens", self.max_new_tokens, "must be a positive integer")
        _require(self.cache_budget is None or self.cache_budget >= 1, "sample.cache_budget",
                 self.cache_budget, "must be >= 1 or null (one slot per step)")
        _require(self.temperature >= 0, "sample.temperature", self.temperature, "must be >= 0")
        _require(self.top_k is None or self.top_k >= 1, "sample.top_k", self.top_k,
                 "must be >= 1 or null")
        _require(self.top_p is None or 0 < self.top_p <= 1, "sample.top_p", self.top_p,
                 "must be in (0, 1] or null")
        _require(self.min_p is None or 0 <= self.min_p < 1, "sample.min_p", self.min_p,
                 "must be in [0, 1) or null")
        if self.exit is not None:
            _check_exit(self.exit)


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: the model and the sections other subsystems read."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()
    mesh: MeshConfig = MeshConfig()
    seed: int = 0

    def __post_init__(self) -> None:
        # The curriculum climbs to the model's mean; starting above it would need a longer
        # gradient scan than the one compiled (DepthPolicy.max_grad).
        _require(not self.train.recurrence_curriculum_steps
                 or self.train.recurrence_curriculum_start <= self.model.mean_recurrence,
                 "train.recurrence_curriculum_start", self.train.recurrence_curriculum_start,
                 f"must be <= model.mean_recurrence={self.model.mean_recurrence}")
