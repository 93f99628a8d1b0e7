"""The static plan of one compiled generation program: every option checked, every shape fixed.

Everything here runs before anything is traced, so a bad option is a ValueError that names it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

from rdlm.config import ModelConfig
from rdlm.generation import cache as kvc
from rdlm.generation.exits import ExitConfig, as_exit_config
from rdlm.model import group_sizes

PAD_ID = 0  # fills padding in the prompt buffer and the tokens after a row's stop token


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Self-speculative decoding: draft with few iterations, verify at the full r.

    ``accept_prob=None`` accepts a draft token when it equals the verifier's choice (the argmax
    under greedy decoding: output identical to plain decoding); a number accepts it when the
    verifier gives it at least that probability (faster, approximate). A draft runs
    ``min(draft_steps, r)`` iterations.
    """

    num_draft: int = 4
    draft_steps: int = 4
    accept_prob: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_draft", "draft_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative {name}={v!r} must be a positive integer.")
        if self.accept_prob is not None and not 0.0 < self.accept_prob <= 1.0:
            raise ValueError(f"speculative accept_prob={self.accept_prob!r} must be in (0, 1].")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How a token is drawn from logits; temperature 0 is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be a number >= 0.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be a positive integer.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1].")
        if self.min_p is not None and not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class ThoughtConfig:
    """Continuous thoughts in the prompt (SPEC §2): every prompt position holding ``token_id``
    takes the previous position's last hidden state ``ln_f(coda(ln_f(s_r)))`` as its input, in
    place of the token's base ``wte[token] · sqrt(d)``. Generated tokens are always ordinary.

    With ``model.token_shift``, a thought's input is that hidden state alone and later positions
    shift in the ``token_id`` embedding as for any token; ``shift_sees_thoughts`` instead shifts
    the hidden state itself into the later positions, and the thought gets the shift of its own
    predecessors (the rules of `rdlm.coconut.thoughts.thought_inputs`).
    """

    token_id: int
    shift_sees_thoughts: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every static choice of one compiled program (shapes, features); hashable."""

    cfg: ModelConfig
    batch: int
    prompt_len: int
    cache_len: int
    max_new_tokens: int
    num_slots: int
    exit: ExitConfig | None
    continuous_cot: bool
    speculative: SpeculativeConfig | None
    sampling: SamplingConfig
    stop_tokens: tuple[int, ...]
    init_scale: float
    return_logits: bool
    thoughts: ThoughtConfig | None = None
    # Where the thoughts sit in the right-aligned prompts (`thought_layout`): after the prompt's
    # parallel prefill, `thought_steps` positions run one at a time, then its last `thought_block`
    # positions run as one block.
    thought_steps: int = 0
    thought_block: int = 0
    # Depth-continuous batching (`rdlm.generation.continuous`): prompt slots in the queue, which
    # ``batch`` rows work through; 0 for the lockstep programs. ``stage_rows``: prompts prefilled
    # together, ahead of the rows that will take them (`default_stage_rows`).
    queue: int = 0
    stage_rows: int = 0
    # Lockstep generation over a device mesh (`generate(mesh=)`): the program names it as its
    # context (`backend.shard_mesh`), and the prompt's fused attention and the decode kernel
    # run per shard of it. None on one device, and in the depth-continuous groups, whose
    # `shard_map` names theirs.
    mesh: jax.sharding.Mesh | None = None

    @property
    def prefill_len(self) -> int:
        """Prompt positions before the earliest thought: one parallel pass."""
        return self.prompt_len - self.thought_steps - self.thought_block

    @property
    def track_latest(self) -> bool:
        return self.exit is not None

    @property
    def out_len(self) -> int:
        extra = 0 if self.speculative is None else self.speculative.num_draft
        return self.max_new_tokens + extra



def prompt_rows(prompt_tokens: Any, prompt_lengths: Any, cfg: ModelConfig) -> list[list[int]]:
    """Validated prompts as lists of ids: a list of id lists, one id list, or a padded array
    [batch, length] (prompts left-aligned) with ``prompt_lengths``."""
    if prompt_lengths is not None:
        array = np.asarray(prompt_tokens)
        lengths = np.asarray(prompt_lengths).reshape(-1)
        if array.ndim != 2 or lengths.shape[0] != array.shape[0]:
            raise ValueError(f"a padded prompt array must be [batch, length] with one length per "
                             f"row; got shape {array.shape} and {lengths.shape[0]} lengths.")
        if np.any(lengths > array.shape[1]):
            raise ValueError(f"prompt_lengths {lengths.tolist()} exceed the array length "
                             f"{array.shape[1]}.")
        rows = [array[i, :int(n)].tolist() for i, n in enumerate(lengths)]
    else:
        if isinstance(prompt_tokens, (np.ndarray, jax.Array)):
            prompt_tokens = np.asarray(prompt_tokens).tolist()
        if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
            raise ValueError("prompt_tokens is empty: give a list of token-id lists (one per row).")
        if all(isinstance(t, (int, np.integer)) for t in prompt_tokens):
            prompt_tokens = [prompt_tokens]
        rows = [list(r) if isinstance(r, (list, tuple, np.ndarray)) else r for r in prompt_tokens]
    if not rows:
        raise ValueError("prompt_tokens is empty: give at least one prompt.")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(row).__name__}.")
        if len(row) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token.")
        for t in row:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"prompt {i} holds {t!r}: token ids must be integers.")
        bad = [int(t) for t in row if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token ids {bad[:5]} outside the vocabulary "
                             f"[0, {cfg.vocab_size}).")
    return [[int(t) for t in row] for row in rows]


def left_pad(rows: list[list[int]], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """[batch, length] int32 (default: the longest prompt) with each prompt right-aligned, and
    the padding per row."""
    longest = max(len(r) for r in rows) if length is None else length
    prompt_bt = np.full((len(rows), longest), PAD_ID, np.int32)
    pad_b = np.array([longest - len(r) for r in rows], np.int32)
    for i, row in enumerate(rows):
        prompt_bt[i, pad_b[i]:] = row
    return prompt_bt, pad_b


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    return int(value)


def make_plan(cfg: ModelConfig, rows: list[list[int]], *, max_new_tokens: int, num_steps: int,
              exit: ExitConfig | str | None = None, cache_budget: int | None = None,
              continuous_cot: bool = False, speculative: SpeculativeConfig | None = None,
              sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
              init_scale: float = 0.0, return_logits: bool = False,
              thoughts: ThoughtConfig | None = None, prompt_len: int | None = None) -> Plan:
    """Check every option and fix the static shape of the program; raises ValueError."""
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    num_steps = _positive_int("num_steps", num_steps)
    if cache_budget is not None:
        if isinstance(cache_budget, bool) or not isinstance(cache_budget, (int, np.integer)) \
                or cache_budget < 1:
            raise ValueError(f"cache_budget={cache_budget!r} must be an integer >= 1 (recurrence "
                             "slots kept per core layer), or None for one slot per step.")
    exit_cfg = as_exit_config(exit)
    if speculative is True:
        speculative = SpeculativeConfig()
    if speculative is not None and not isinstance(speculative, SpeculativeConfig):
        raise TypeError("speculative must be a SpeculativeConfig, True or None.")
    if speculative is not None and (exit_cfg is not None or continuous_cot):
        raise ValueError("speculative decoding verifies a block of tokens in one parallel pass, "
                         "so it cannot be combined with adaptive exit or continuous_cot.")
    longest = _prompt_len(rows, prompt_len)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens="
                         f"{max_new_tokens} is {longest + max_new_tokens}, beyond "
                         f"model.max_seq_len={cfg.max_seq_len}.")
    stop = tuple(int(t) for t in stop_tokens)
    bad = [t for t in stop if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"stop_tokens {bad} are outside the vocabulary [0, {cfg.vocab_size}).")
    extra = 0 if speculative is None else speculative.num_draft
    return Plan(cfg=cfg, batch=len(rows), prompt_len=longest,
                 cache_len=longest + max_new_tokens - 1 + extra, max_new_tokens=max_new_tokens,
                 num_slots=int(cache_budget) if cache_budget is not None else num_steps,
                 exit=exit_cfg, continuous_cot=bool(continuous_cot), speculative=speculative,
                 sampling=sampling, stop_tokens=stop, init_scale=float(init_scale),
                 return_logits=bool(return_logits), thoughts=_check_thoughts(thoughts, cfg),
                 **thought_layout(rows, thoughts))


def _prompt_len(rows: list[list[int]], prompt_len: int | None) -> int:
    longest = max(len(r) for r in rows)
    if prompt_len is None:
        return longest
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, (int, np.integer)) \
            or prompt_len < longest:
        raise ValueError(f"prompt_len={prompt_len!r} must be an integer >= the longest prompt "
                         f"({longest} tokens).")
    return int(prompt_len)


def _check_thoughts(thoughts: ThoughtConfig | None, cfg: ModelConfig) -> ThoughtConfig | None:
    if thoughts is not None and not 0 <= thoughts.token_id < cfg.vocab_size:
        raise ValueError(f"thought token id {thoughts.token_id} is outside the vocabulary "
                         f"[0, {cfg.vocab_size}).")
    return thoughts


def thought_layout(rows: list[list[int]], thoughts: ThoughtConfig | None) -> dict[str, int]:
    """How the prompt positions from the earliest thought on are run, counted from the end of the
    right-aligned prompts.

    A thought takes the hidden state of the position before it, so every thought starts a new
    pass over the model: the positions from the earliest thought (in any row) up to the latest
    one run one at a time (``thought_steps``); from the latest thought on nothing waits for a
    hidden state of the same pass, so the rest is one block (``thought_block``).
    """
    spans = [(len(row) - row.index(thoughts.token_id),
              len(row) - (len(row) - 1 - row[::-1].index(thoughts.token_id)))
             for row in rows if thoughts is not None and thoughts.token_id in row]
    if not spans:
        return {"thought_steps": 0, "thought_block": 0}
    block = min(last for _, last in spans)
    return {"thought_steps": max(first for first, _ in spans) - block, "thought_block": block}


@functools.lru_cache(maxsize=64)
def plan_cache_bytes(plan: Plan) -> int:
    """The cache size of a plan (memoised: building the shapes costs more host time than a short
    generation's other checks); a depth-continuous plan's includes the staging cache of the next
    prompts' prefills, ``stage_rows`` × the prompt length (`rdlm.generation.continuous`)."""
    size = kvc.cache_bytes(plan.cfg, plan.batch, plan.cache_len, plan.num_slots, plan.track_latest)
    if plan.queue:
        size += kvc.cache_bytes(plan.cfg, plan.stage_rows, plan.prompt_len, plan.num_slots,
                                plan.track_latest)
    return size


def pass_weights(cfg: ModelConfig) -> dict[str, int]:
    """Parameters one pass of each stage of decoding reads, whatever its rows (the keys of
    ``GenerateOutput.stats["passes"]``): the prelude (with the token shift; the embedding is
    only gathered), one core step, and the coda with the final norm and the output head (the
    tied embedding, or ``lm_head``). A model may have no prelude or coda layers (the demo's)."""
    sizes = group_sizes(cfg)
    coda = sizes.get("coda", 0) + sizes.get("ln_f", 0) + (sizes.get("lm_head") or sizes["wte"])
    prelude = sum(n for group, n in sizes.items()
                  if group not in ("core", "coda", "ln_f", "wte", "lm_head"))
    return {"prelude": prelude, "core": sizes["core"], "coda": coda}


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Prompt positions in one prefill from which it does enough arithmetic per weight read to be
# bound by compute on GPUs and TPUs (a few hundred flops per byte read), and on CPUs.
STAGE_POSITIONS = 1024


def default_stage_rows(batch: int, prompt_len: int) -> int:
    """Prompts a depth-continuous program prefills together: enough for ``STAGE_POSITIONS``
    positions, at most ``batch``. Short prompts stage a whole batch, since one prefill of a few
    positions costs about what one of ``batch`` rows does (weight reads bound it); long prompts
    stage fewer, since their prefill is bound by compute whatever the rows, and the staged
    cache and the prefill's activations shrink with them (at 2,048-token prompts the staged
    cache of a whole batch is half the main one)."""
    return max(1, min(batch, -(-STAGE_POSITIONS // prompt_len)))


def continuous_plan(plan: Plan, num_prompts: int, batch_size: int | None,
                    stage_rows: int | None = None) -> Plan:
    """``plan`` (made for every prompt) as a depth-continuous program: ``batch_size`` rows
    (default: one per prompt), ``stage_rows`` prompts prefilled together (default:
    `default_stage_rows`), and a queue padded to rows × a power of two (and to whole stages),
    so that the compilations stay few however many prompts come; the exit threshold becomes
    data."""
    if plan.speculative is not None:
        raise ValueError("continuous_batching runs every row at its own position and step; "
                         "speculative decoding verifies a block of positions shared by the "
                         "batch: choose one.")
    if plan.thoughts is not None:
        raise ValueError("continuous_batching does not take continuous thoughts in the prompt "
                         "(thoughts=...): their prefill runs position by position for the batch.")
    rows = num_prompts if batch_size is None else _positive_int("batch_size", batch_size)
    rows = min(rows, num_prompts)
    stage = (default_stage_rows(rows, plan.prompt_len) if stage_rows is None
             else min(_positive_int("stage_rows", stage_rows), rows))
    queue = rows * _power_of_two_at_least(-(-num_prompts // rows))
    queue = -(-queue // stage) * stage  # every stage a whole slice of the queue
    exit_cfg = None if plan.exit is None else dataclasses.replace(plan.exit, threshold=None)
    return dataclasses.replace(plan, batch=rows, queue=queue, stage_rows=stage, exit=exit_cfg)


def prompt_bucket(longest: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The prompt length of a depth-continuous program: the next power of two (at least 8), so
    that calls with different prompts share a compilation; no more than the context allows."""
    return max(longest, min(max(8, _power_of_two_at_least(longest)),
                            max_seq_len - max_new_tokens))
