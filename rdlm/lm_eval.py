"""An lm-evaluation-harness model for rdlm, registered as ``rdlm`` (docs/evaluation.md).

    rdlm lm-eval --model_args checkpoint=runs/demo,num_steps=32 --tasks arc_easy
    lm_eval.simple_evaluate(model=rdlm.lm_eval.RDLM(checkpoint="runs/demo", num_steps=32), ...)

The three request types:

- ``loglikelihood`` / ``loglikelihood_rolling``: the model's forward at ``num_steps`` core
  iterations, batched and length-bucketed; r is data in the program, so one compilation per
  length bucket serves every r.
- ``generate_until``: `rdlm.generate` (prefill, KV cache, adaptive exit, cache budget,
  continuous chain of thought), cut at the first stop string.

The adaptive exit only applies to generation: a log-likelihood scores all of a continuation's
tokens in one parallel pass, where each position runs the same r.

Importing this module imports lm-eval (the ``eval`` extra); ``import rdlm`` never does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # the optional extra is missing (or broken)
    raise ImportError(f"rdlm.lm_eval needs lm-evaluation-harness ({err}): install it with "
                      "pip install 'rdlm[eval]'.") from err

from rdlm.config import ConfigError, MeshConfig, ModelConfig
from rdlm.data.tokenizer import Tokenizer, load_tokenizer, run_tokenizer
from rdlm.generation import ExitConfig, generate
from rdlm.generation.scoring import (ScoreRow, batches_by_length, bucket_length, pack_rows,
                                     score_batch, score_row)
from rdlm.model import Params
from rdlm.runtime import sharding

MODEL_NAME = "rdlm"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task gives none
# lm-eval's generation keywords that rdlm maps onto `rdlm.generate` (anything else is refused,
# so that a task asking for, say, beam search is not silently run greedily).
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "min_p")
# Keys lm-eval passes to every model whatever its backend: a device mesh replaces ``device``,
# and batches have a fixed size (no search for the largest that fits).
IGNORED_ARGS = ("device", "max_batch_size")


# ---------------------------------------------------------------------------------------------
# model_args.


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """The model_args of ``--model rdlm`` (each one: docs/evaluation.md)."""

    checkpoint: str
    num_steps: int | None = None  # None: the model's training mean r (model.mean_recurrence)
    exit: str | None = None  # adaptive exit for generation, as `rdlm sample --exit`
    cache_budget: int | None = None  # recurrence slots per core layer in generation
    continuous_cot: bool = False
    # Generation with depth-continuous batching: batch_size rows work through all of a task's
    # requests, each row at its own token and iteration (`rdlm.generation.continuous`).
    continuous_batching: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    dtype: str | None = None  # compute dtype; None: the checkpoint's own
    param_dtype: str = "float32"  # the parameters' dtype (bfloat16: half the memory)
    # Devices that split the weights (tensor parallelism: heads, MLP units, vocabulary);
    # the devices' count divided by it split the batch.
    tensor: int = 1
    max_length: int | None = None  # None: model.max_seq_len
    tokenizer: str | None = None  # None: the one kept with the checkpoint (`run_tokenizer`)
    add_bos: bool = True  # put the beginning-of-text token in front of every context
    seed: int = 0  # key of sampled generation (do_sample=true)


def _field_kind(hint: Any) -> type:
    """int or bool for an int or bool field (optional or not), str for the rest."""
    return next((kind for kind in (bool, int) if hint is kind or kind in typing.get_args(hint)),
                str)


_FIELD_TYPES = {name: _field_kind(hint)
                for name, hint in typing.get_type_hints(EvalOptions).items()}
_POSITIVE = ("num_steps", "cache_budget", "batch_size", "max_length", "tensor")


def _coerce(key: str, value: Any) -> Any:
    """A model_arg as its field's type; the command line hands over strings, ints and bools."""
    kind = _FIELD_TYPES.get(key, str)
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"model_args {key}={value!r} must be true or false.")
    if kind is int:
        if isinstance(value, bool) or not str(value).lstrip("-").isdigit():
            raise ConfigError(f"model_args {key}={value!r} must be an integer.")
        value = int(value)
        if key in _POSITIVE and value < 1:
            raise ConfigError(f"model_args {key}={value} must be >= 1.")
        return value
    return str(value)


def parse_options(model_args: dict[str, Any]) -> EvalOptions:
    """`EvalOptions` from lm-eval's model_args; an unknown key, a bad value or exit spec, or no
    checkpoint raise `ConfigError` naming the key and the fix."""
    fields = [f.name for f in dataclasses.fields(EvalOptions)]
    args = {k: v for k, v in model_args.items() if k not in IGNORED_ARGS}
    for key in args:
        if key not in fields:
            import difflib
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown model_args key {key!r}{hint}; --model rdlm takes "
                              f"{', '.join(fields)}.")
    if args.get("batch_size") == "auto":  # lm-eval's batch-size search: a fixed size here
        args["batch_size"] = DEFAULT_BATCH_SIZE
    if not args.get("checkpoint"):
        raise ConfigError("model_args needs checkpoint=DIR: an rdlm run directory, one of its "
                          "checkpoint steps, or a Huginn-layout directory (config.json + "
                          "*.safetensors).")
    options = EvalOptions(**{k: _coerce(k, v) for k, v in args.items()})
    if options.exit is not None:
        try:
            ExitConfig.parse(options.exit)
        except ValueError as err:
            raise ConfigError(f"model_args exit={options.exit!r}: {err} Use criterion[:threshold], "
                              "e.g. exit=kl:1e-3, as `rdlm sample --exit`.") from None
    for key in ("dtype", "param_dtype"):
        if getattr(options, key) not in (None, "float32", "bfloat16"):
            raise ConfigError(f"model_args {key}={getattr(options, key)!r} must be float32 or "
                              "bfloat16.")
    return options


# ---------------------------------------------------------------------------------------------
# The checkpoint.


def is_huginn_dir(path: Path) -> bool:
    """A Hugging Face directory in Huginn-0125's layout (as opposed to an rdlm checkpoint)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _huginn_dtype(path: Path) -> str:
    """The compute dtype a Huginn directory was saved in (bfloat16 or float32)."""
    try:
        torch_dtype = json.loads((path / "config.json").read_text()).get("torch_dtype")
    except (OSError, ValueError, AttributeError):
        return "float32"  # load_huginn reports an unreadable config.json
    return "bfloat16" if torch_dtype == "bfloat16" else "float32"


def model_tokenizer(path: Path, tokenizer: str | None, trained_with: str | Path) -> Tokenizer:
    """model_args ``tokenizer``, else the tokenizer.json kept with the checkpoint, else the one
    it was trained with (`run_tokenizer`); a missing one names the model_arg that fixes it."""
    try:
        if tokenizer:
            return load_tokenizer(tokenizer)
        return run_tokenizer(path, trained_with)
    except (FileNotFoundError, ConfigError) as err:
        given = f"model_args tokenizer={tokenizer!r}: " if tokenizer else ""
        raise ConfigError(f"{given}{err} (model_args tokenizer=PATH gives a tokenizer.json, "
                          "tokenizer=chars or ascii a built-in one)") from None


def load_model(checkpoint: str, dtype: str | None, tokenizer: str | None,
               param_dtype: str = "float32") -> tuple[ModelConfig, Params, Tokenizer]:
    """(model config with the compute dtype, params in ``param_dtype``, tokenizer) of
    ``checkpoint``."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ConfigError(f"model_args checkpoint={checkpoint!r} does not exist: give an rdlm run "
                          "directory, one of its checkpoint steps, or a Huginn-layout directory.")
    if is_huginn_dir(path):
        from rdlm.interop import load_huginn
        cfg, params = load_huginn(path, dtype=param_dtype,
                                  compute_dtype=dtype or _huginn_dtype(path))
        tok = model_tokenizer(path, tokenizer, trained_with=path)
    else:
        from rdlm.runtime import checkpoint as ckpt
        config, params = ckpt.load_params(path, report=ckpt.say_on_stderr, dtype=param_dtype)
        cfg = config.model if dtype is None else dataclasses.replace(config.model, dtype=dtype)
        tok = model_tokenizer(path, tokenizer, trained_with=config.data.tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer {tok.name!r} has {tok.vocab_size} tokens but the "
                          f"model's vocabulary holds {cfg.vocab_size}: pass the tokenizer the "
                          "model was trained with (model_args tokenizer=PATH).")
    return cfg, params, tok


# ---------------------------------------------------------------------------------------------
# Generation.


def generation_settings(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's generation keywords as rdlm's: until, max_gen_toks and the sampling knobs
    (greedy unless do_sample with a temperature > 0)."""
    kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ConfigError(f"generation_kwargs {unknown} are not supported by --model rdlm; it "
                          f"takes {', '.join(GEN_KWARGS)}.")
    sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
    top_k, top_p, min_p = (kwargs.get(k) for k in ("top_k", "top_p", "min_p"))
    return {"until": [s for s in kwargs["until"] if s], "max_gen_toks": int(kwargs["max_gen_toks"]),
            "temperature": float(kwargs["temperature"]) if sample else 0.0,
            "top_k": int(top_k) if sample and top_k else None,
            "top_p": float(top_p) if sample and top_p is not None else None,
            "min_p": float(min_p) if sample and min_p else None}


def stop_token_ids(tok: Tokenizer, until: Sequence[str]) -> tuple[int, ...]:
    """The tokenizer's end-of-text/turn ids, plus the id of every stop string that is exactly
    one token: a row can stop there, since its text holds the stop string and is cut at its
    first one anyway (longer stop strings are found in the decoded text)."""
    ids = list(tok.stop_ids)
    for text in until:
        encoded = tok.encode(text) if _encodable(tok, text) else []
        if len(encoded) == 1 and tok.decode(encoded) == text:
            ids.append(encoded[0])
    return tuple(dict.fromkeys(ids))


def _encodable(tok: Tokenizer, text: str) -> bool:
    try:
        tok.encode(text)
    except ValueError:  # a character tokenizer without that character: it is never generated
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The model.


@register_model(MODEL_NAME)
class RDLM(TemplateLM):
    """A recurrent-depth checkpoint as an lm-eval model (model_args: `EvalOptions`)."""

    def __init__(self, checkpoint: str | None = None, **model_args: Any) -> None:
        super().__init__()
        self.options = parse_options({"checkpoint": checkpoint, **model_args})
        cfg, params, tok = load_model(self.options.checkpoint, self.options.dtype,
                                      self.options.tokenizer, self.options.param_dtype)
        self.cfg, self.tokenizer = cfg, tok
        self.num_steps = self.options.num_steps or cfg.mean_recurrence
        self.max_length = self.options.max_length or cfg.max_seq_len
        if self.max_length > cfg.max_seq_len:
            raise ConfigError(f"model_args max_length={self.max_length} exceeds the model's "
                              f"max_seq_len={cfg.max_seq_len}: lower max_length.")
        self.exit = None if self.options.exit is None else ExitConfig.parse(self.options.exit)
        # Every device: the weights split over "tensor" (replicated when it is 1), the batch
        # over "data". Over several hosts (jax.distributed initialised, as `rdlm lm-eval` does
        # on a cluster it detects) every process runs the same evaluation and gets every
        # result. On one device the arrays stay as loaded, so the programs are exactly those of
        # a direct call.
        self.mesh = sharding.make_mesh(MeshConfig(data=-1, tensor=self.options.tensor))
        dp = sharding.data_parallel_size(self.mesh)
        self.batch_size = -(-self.options.batch_size // dp) * dp
        self.params = (params if self.mesh.size == 1 else
                       jax.device_put(params, sharding.param_shardings(cfg, self.mesh)))
        self.constrain = sharding.state_constraint(self.mesh)
        self.generation_stats = {"tokens": 0, "core_steps": 0}
        self._sampled_batches = 0  # folded into the key of each sampled batch

    def at(self, num_steps: int, exit: str | None = None) -> "RDLM":
        """This model at another r (and exit spec), sharing the loaded params and the compiled
        programs: an r sweep loads the checkpoint once."""
        options = parse_options({**dataclasses.asdict(self.options), "num_steps": num_steps,
                                 "exit": exit})
        other = copy.copy(self)
        other.options, other.num_steps = options, options.num_steps
        other.exit = None if exit is None else ExitConfig.parse(exit)
        other.generation_stats = {"tokens": 0, "core_steps": 0}
        other._sampled_batches = 0
        return other

    # -- lm-eval's construction hooks: model_args win over the command line's --batch_size, and
    # the keys every backend gets (device, max_batch_size) are dropped.
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                               ) -> "RDLM":
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict[str, Any] | None = None) -> "RDLM":
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in IGNORED_ARGS}
        return cls(**{**extra, **arg_dict})

    # -- tokens ----------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.require("eos", "lm-eval's end-of-text token")

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and each rolling window start from: beginning of text."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """Ids of ``string``, after the beginning-of-text token (the model saw one in front of
        every document) unless ``add_special_tokens=False``, ``add_bos=false`` or the text
        starts with it already (a chat template's)."""
        ids = self.tokenizer.encode(string)
        add = self.options.add_bos if add_special_tokens is None else add_special_tokens
        bos = self.tokenizer.bos_id
        if add and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- chat ------------------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """A description of the chat format, which lm-eval records with the results (Huginn's
        format in code, not a Jinja template); None when not asked for."""
        if not chat_template:
            return None
        self.apply_chat_template([{"role": "user", "content": ""}])  # raises if it has none
        return "huginn-0125 chat format (rdlm.data.tokenizer.Tokenizer.chat_text)"

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Messages (system prompt included) in Huginn-0125's chat format, as text."""
        return self.tokenizer.chat_text(chat_history, add_generation_prompt=add_generation_prompt)

    # -- placement -------------------------------------------------------------------------------
    def _on_mesh(self, array: np.ndarray) -> Any:
        """A [batch, ...] host array split over the data axis (as it is when one device)."""
        if self.mesh.size == 1:
            return array
        spec = sharding.batch_spec(self.mesh)
        spec = jax.sharding.PartitionSpec(spec[0], *([None] * (array.ndim - 1)))
        return jax.device_put(array, jax.sharding.NamedSharding(self.mesh, spec))

    # -- log-likelihood --------------------------------------------------------------------------
    def score(self, rows: Sequence[ScoreRow]) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each row, in batches of similar length."""
        pending = []
        for indices in batches_by_length([len(r.inputs) for r in rows], self.batch_size):
            chunk = [rows[i] for i in indices]
            length = bucket_length(max(len(r.inputs) for r in chunk), self.max_length)
            arrays = pack_rows(chunk, self.batch_size, length)
            # Dispatched, not waited for: the host packs the next batch while this one runs.
            pending.append((indices, score_batch(
                self.params, *(self._on_mesh(arrays[k]) for k in
                               ("tokens", "targets", "score_mask")),
                np.int32(self.num_steps), cfg=self.cfg, constrain=self.constrain)))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        for indices, (logp_b, greedy_b) in sharding.to_host(pending):
            for j, i in enumerate(indices):
                results[i] = (float(logp_b[j]), bool(greedy_b[j]))
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        rows = [score_row(context, continuation, self.max_length)
                for _, context, continuation in requests]
        results = self.score(rows)
        for (strings, _, _), result in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        """Each text's log-probability in windows of ``max_length`` tokens (lm-eval's rolling
        windows: every token predicted once, the first from the beginning-of-text token)."""
        rows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(make_disjoint_window, windows):
                rows.append(score_row(context, continuation, self.max_length))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owners, self.score(rows)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation from `rdlm.generate`, cut at its first stop string;
        requests with the same generation keywords share batches."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            settings = generation_settings(requests[indices[0]].args[1])
            texts = self._generate_group([requests[i].args[0] for i in indices], settings)
            for i, text in zip(indices, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]

    def _generate_group(self, contexts: Sequence[str], settings: dict[str, Any]) -> list[str]:
        max_new = settings["max_gen_toks"]
        room = self.max_length - max_new
        if room < 1:
            raise ConfigError(f"max_gen_toks={max_new} leaves no room for the context in "
                              f"max_length={self.max_length}: lower max_gen_toks or raise "
                              "max_length.")
        prompts = [self.tok_encode(c)[-room:] for c in contexts]
        stop = stop_token_ids(self.tokenizer, settings["until"])
        texts: list[str | None] = [None] * len(prompts)
        # Depth-continuous: every request in one queue over batch_size rows; lockstep: batches
        # of similar lengths, padded to one shape.
        batches = ([list(range(len(prompts)))] if self.options.continuous_batching else
                   batches_by_length(list(map(len, prompts)), self.batch_size))
        for indices in batches:
            rows = [prompts[i] for i in indices]
            if not self.options.continuous_batching:
                rows += [rows[-1]] * (self.batch_size - len(rows))  # one shape for every batch
            out = self._generate(rows, max_new, stop, settings)
            for j, i in enumerate(indices):
                ids = out.rows()[j]
                if ids and ids[-1] in self.tokenizer.stop_ids:
                    ids = ids[:-1]
                texts[i] = postprocess_generated_text(self.tok_decode(ids), settings["until"],
                                                      None)
                self.generation_stats["tokens"] += int(out.lengths[j])
                self.generation_stats["core_steps"] += int(out.steps[j].sum())
        return texts  # type: ignore[return-value]

    def _generate(self, rows: list[list[int]], max_new: int, stop: Sequence[int],
                  settings: dict[str, Any]) -> Any:
        key = None
        if settings["temperature"] > 0:
            self._sampled_batches += 1
            key = jax.random.fold_in(jax.random.key(self.options.seed), self._sampled_batches)
        mesh = None if self.mesh.size == 1 else self.mesh
        if self.options.continuous_batching:  # batch_size rows, each device its share of them
            layout = dict(continuous_batching=True, batch_size=self.batch_size, mesh=mesh)
        else:  # one padded batch, split over the mesh
            layout = dict(prompt_len=bucket_length(max(map(len, rows)), self.max_length - max_new),
                          mesh=mesh)
        return generate(self.params, self.cfg, rows, max_new_tokens=max_new,
                        num_steps=self.num_steps, exit=self.exit,
                        cache_budget=self.options.cache_budget,
                        continuous_cot=self.options.continuous_cot,
                        temperature=settings["temperature"], top_k=settings["top_k"],
                        top_p=settings["top_p"], min_p=settings["min_p"], stop_tokens=stop,
                        key=key, **layout)

    @property
    def mean_steps(self) -> float:
        """Mean core iterations per generated token so far (``num_steps`` without an exit)."""
        tokens = self.generation_stats["tokens"]
        return self.generation_stats["core_steps"] / tokens if tokens else float("nan")

