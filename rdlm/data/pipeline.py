"""Grain pipelines: source → shuffle → repeat → render → pack → batch → this process's rows.

The training loop imports `make_train_iterator` and `make_eval_batches`. Every row is a dict of
int32 arrays ``[rows, seq_len]``:

- ``inputs``: token ids; ``targets``: the next token of the same segment;
- ``segment_ids``: 1, 2, … per packed document, 0 on padding (the model's attention keeps
  segments apart and restarts positions per segment);
- ``loss_mask``: 1 where the target counts — never on padding or across a segment boundary, and
  only on answer/reasoning tokens of supervised tasks when ``data.loss_on="completion"``.

Determinism: shuffling acts on example indices with grain's seeded index shuffle (a new
permutation every epoch), and synthetic examples are pure functions of their index. With slot
packing (the default for examples) and memmap windows a batch is a pure function of its number,
process p takes its block of rows of every global batch, and the iterator state is the next batch
number — the same on every process, so a run resumes on any number of processes. The streaming
packers (first_fit / concat) shard examples by process and keep per-process state. Either way
``set_state(get_state())`` on a fresh iterator resumes with exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import itertools

import atexit
import weakref
from typing import Any, Callable

import grain
import grain.experimental as grain_exp
import numpy as np

from rdlm.config import Config, ConfigError, DataConfig
from rdlm.data import sources as src
from rdlm.data.render import render, render_branches
from rdlm.data.tasks import (SIBLING_QUESTIONS, Example, check_split, load_gsm8k_aug, make_task,
                             split_of)
from rdlm.data.tokenizer import Tokenizer, load_tokenizer

Batch = dict[str, np.ndarray]
FEATURES = ("inputs", "targets", "loss_mask")


# ---------------------------------------------------------------------------------------------
# Per-example transformations (pure functions on numpy arrays).


def example_to_features(tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """A document's tokens and per-token mask → shifted inputs/targets/loss_mask (length − 1)."""
    tokens = np.asarray(tokens, np.int32)
    return {"inputs": tokens[:-1], "targets": tokens[1:],
            "loss_mask": np.asarray(mask, np.int32)[1:]}


def window_to_row(window: np.ndarray, eos_id: int) -> Batch:
    """A window of seq_len + 1 tokens from a flat stream → one row. A document ends with its EOS;
    the next token starts a new segment, and the target that would cross into it is masked."""
    window = np.asarray(window, np.int32)
    segment = 1 + np.concatenate([[0], np.cumsum(window[:-1] == eos_id)]).astype(np.int32)
    return {"inputs": window[:-1], "targets": window[1:], "segment_ids": segment[:-1],
            "loss_mask": (segment[1:] == segment[:-1]).astype(np.int32)}


def _check_fits(length: int, seq_len: int) -> None:
    if length > seq_len:
        raise ValueError(f"an example needs {length} positions but train.seq_len={seq_len}: raise "
                         "train.seq_len (and model.max_seq_len), lower data.difficulty, or use "
                         "data.packing=concat for long documents.")


def _rename_packed(row: dict[str, np.ndarray]) -> Batch:
    """grain's packers name segment ids per feature; all features share them."""
    out = {k: np.asarray(row[k], np.int32) for k in FEATURES}
    out["segment_ids"] = np.asarray(row["inputs_segment_ids"], np.int32)
    out["loss_mask"] = out["loss_mask"] * (out["segment_ids"] > 0)
    return out


def _stack(rows: list[Batch]) -> Batch:
    return {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in rows[0]}


# ---------------------------------------------------------------------------------------------
# Sources by config.


def tokenizer_for(data: DataConfig) -> Tokenizer:
    """``data.tokenizer``, checked for the end-of-text token every source needs (it ends a rendered
    example and separates the documents of a token stream)."""
    try:
        tok = load_tokenizer(data.tokenizer)
    except FileNotFoundError as err:
        raise ConfigError(f"data.tokenizer={data.tokenizer!r}: {err}") from None
    tok.require("eos", f"data.source={data.source!r}")
    return tok


def _render_fn(data: DataConfig, tok: Tokenizer, split: str = "train"
               ) -> Callable[[Example], dict[str, np.ndarray]]:
    if data.branches:
        return _branches_fn(data, tok, split)

    def fn(example: Example) -> dict[str, np.ndarray]:
        tokens, mask = render(example, tok, fmt=data.format, loss_on=data.loss_on,
                              num_latent_steps=data.num_latent_steps,
                              latents_per_step=data.latents_per_step)
        return example_to_features(tokens, mask)
    return fn


def _branches_fn(data: DataConfig, tok: Tokenizer, split: str
                 ) -> Callable[[Example], dict[str, np.ndarray]]:
    """Every question of an example's context in one row (see `render_branches`), keeping only
    questions of this split, so a held-out question is never trained on."""
    siblings = SIBLING_QUESTIONS[data.task]

    def fn(example: Example) -> dict[str, np.ndarray]:
        questions = [qa for qa in siblings(example) if split_of(qa[0]) == split]
        questions = questions or [(example.question, example.answer)]
        rng = np.random.default_rng(int.from_bytes(example.question.encode()[-8:], "little"))
        questions = [questions[i] for i in rng.permutation(len(questions))]
        tokens, mask, branch = render_branches(questions, tok, loss_on=data.loss_on)
        return {**example_to_features(tokens, mask), "branch_ids": branch[:-1]}
    return fn


def _doc_fn(data: DataConfig, tok: Tokenizer) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A pre-tokenized document; an EOS is appended unless present so that the model learns to
    end documents, and every token counts."""
    def fn(doc: np.ndarray) -> dict[str, np.ndarray]:
        doc = np.asarray(doc, np.int32)
        if len(doc) == 0 or doc[-1] != tok.eos_id:
            doc = np.append(doc, np.int32(tok.eos_id))
        return example_to_features(doc, np.ones(len(doc), np.int32))
    return fn


def example_source(cfg: Config, split: str) -> src.TaskSource | src.ExampleListSource:
    """The examples of a supervised source (synthetic task or GSM8k-Aug files)."""
    data = cfg.data
    if data.source == "synthetic":
        task = make_task(data.task, data.difficulty, data.task_args)
        return src.TaskSource(task, split, data.num_examples)
    if data.source == "gsm8k":
        examples = [e for path in src.expand_paths(data.paths, split)
                    for e in load_gsm8k_aug(path)]
        return src.ExampleListSource(examples)
    raise ConfigError(f"data.source={data.source!r} holds tokens, not examples.")


def _indexed(cfg: Config, split: str, tok: Tokenizer) -> tuple[Any, Callable[[Any], Any]]:
    """(random-access source, record → features; for memmap windows, record → row)."""
    data = cfg.data
    seq_len = cfg.train.seq_len
    if data.source in ("synthetic", "gsm8k"):
        return example_source(cfg, split), _render_fn(data, tok, split)
    files = src.expand_paths(data.paths, split)
    if data.source == "memmap":
        # A glob such as train-* also matches the .bin dtype sidecars and prepare's metadata.
        files = [f for f in files if not f.endswith(".json")]
        return src.TokenWindowSource(files, seq_len), lambda w: window_to_row(w, tok.eos_id)
    if data.source == "arrayrecord":
        return src.ArrayRecordDocSource(files), _doc_fn(data, tok)
    if data.source == "parquet":
        return src.ParquetDocSource(files, data.token_column), _doc_fn(data, tok)
    raise ConfigError(f"data.source={data.source!r} is not supported.")


# ---------------------------------------------------------------------------------------------
# The pipeline.


def rows_per_process(cfg: Config, process_count: int) -> int:
    if cfg.train.batch_size % process_count:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is invalid: must be divisible "
                          f"by the number of processes ({process_count}).")
    return cfg.train.batch_size // process_count


def resolve_packing(data: DataConfig) -> str:
    """The packing ``auto`` stands for: fixed slots for supervised examples (host-count invariant),
    whole windows for flat token streams, first-fit for variable-length documents."""
    if data.source == "memmap":
        return "windows"
    if data.packing != "auto":
        return data.packing
    return "first_fit" if data.source in ("arrayrecord", "parquet") else "slots"


def make_dataset(cfg: Config, *, split: str = "train", process_index: int = 0,
                 process_count: int = 1, shuffle: bool | None = None,
                 repeat: bool = True) -> grain.IterDataset:
    """The batched grain `IterDataset` behind `make_train_iterator` (exposed for inspection)."""
    check_split(split)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    data, seq_len = cfg.data, cfg.train.seq_len
    if seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} is invalid: must be <= "
                          f"model.max_seq_len={cfg.model.max_seq_len}.")
    tok = tokenizer_for(data)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is invalid: the "
                          f"{data.tokenizer!r} tokenizer has {tok.vocab_size} tokens; set "
                          f"model.vocab_size >= {tok.vocab_size} (a multiple of 64 is fastest).")
    rows = rows_per_process(cfg, process_count)
    source, transform = _indexed(cfg, split, tok)

    ds = grain.MapDataset.source(source)
    if data.shuffle if shuffle is None else shuffle:
        ds = ds.shuffle(seed=data.shuffle_seed)  # a fresh permutation every epoch
    if repeat:
        ds = ds.repeat()
    packing = resolve_packing(data)
    if data.branches and packing not in ("slots", "none"):
        raise ConfigError(f"data.branches=true needs data.packing 'slots' or 'none', got "
                          f"{packing!r}: the streaming packers do not carry branch ids.")
    if packing in ("slots", "none", "windows"):
        slots = 1 if packing != "slots" else (
            data.examples_per_row or auto_examples_per_row(source, transform, seq_len))
        row_fn = (lambda fs: fs[0]) if packing == "windows" else (lambda fs: pack_slots(fs, seq_len))
        return _indexed_batches(ds.map(transform), row_fn, slots, cfg.train.batch_size, rows,
                                process_index, data)
    return _streaming_batches(ds, transform, packing, seq_len, rows, process_index,
                              process_count, data)


def _indexed_batches(examples: grain.MapDataset, row_fn: Callable[[list], Batch], slots: int,
                     global_rows: int, rows: int, process_index: int, data: DataConfig
                     ) -> grain.IterDataset:
    """Batch b is a pure function of b: global row g holds examples g·slots … g·slots + slots − 1,
    and process p takes rows p·rows … p·rows + rows − 1 of every global batch. The iterator
    state is just the next batch number, the same on every process, so a run resumes on any
    number of processes with the same global batches."""
    def batch_at(b: int) -> Batch:
        first_row = b * global_rows + process_index * rows
        return _stack([row_fn([examples[(first_row + i) * slots + j] for j in range(slots)])
                       for i in range(rows)])

    num_batches = len(examples) // (global_rows * slots)
    if num_batches == 0:
        raise ConfigError(f"the split holds {len(examples)} examples, fewer than one batch of "
                          f"{global_rows} rows x {slots} examples; raise data.num_examples or "
                          "lower train.batch_size.")
    batches = grain.MapDataset.range(num_batches).map(batch_at)
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                                     prefetch_buffer_size=data.prefetch_batches))


def _streaming_batches(ds: grain.MapDataset, transform: Callable, packing: str, seq_len: int,
                       rows: int, process_index: int, process_count: int, data: DataConfig
                       ) -> grain.IterDataset:
    """grain's stateful packers over this process's share (elements p, p + P, …) of the global
    order. Resuming needs the same number of processes."""
    ds = ds[process_index::process_count].map(transform)
    # A small read-ahead: grain scans its whole prefetch buffer on every element.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                              prefetch_buffer_size=16))
    it = _pack(it, packing, seq_len, rows).batch(rows, drop_remainder=True, batch_fn=_stack)
    # Build the next batches in a background thread while the accelerator (which releases the
    # GIL) runs the train step; the iterator state still names the next batch to be returned.
    return grain_exp.ThreadPrefetchIterDataset(it, prefetch_buffer_size=data.prefetch_batches)


def pack_slots(features: list[dict[str, np.ndarray]], seq_len: int) -> Batch:
    """Examples into one row in order, segment ids 1, 2, …; an example that no longer fits is
    left out (rare: the number of slots is chosen so that the longest examples fit)."""
    keys = (*FEATURES, *(("branch_ids",) if "branch_ids" in features[0] else ()))
    row = {k: np.zeros(seq_len, np.int32) for k in (*keys, "segment_ids")}
    used = 0
    for segment, f in enumerate(features, start=1):
        n = len(f["inputs"])
        _check_fits(n, seq_len)
        if used + n > seq_len:
            continue
        for k in keys:
            row[k][used:used + n] = f[k]
        row["segment_ids"][used:used + n] = segment
        used += n
    return row


def auto_examples_per_row(source: Any, transform: Callable, seq_len: int,
                          sample: int = 256) -> int:
    """As many examples per row as fit when all are as long as the longest of the first
    ``sample`` examples (synthetic lengths vary little, so the fill stays high)."""
    longest = max(len(transform(source[i])["inputs"]) for i in range(min(sample, len(source))))
    _check_fits(longest, seq_len)
    return max(1, seq_len // longest)


def _pack(it: grain.IterDataset, packing: str, seq_len: int, rows: int) -> grain.IterDataset:
    lengths = {k: seq_len for k in FEATURES}
    if packing == "concat":
        packed = grain_exp.ConcatThenSplitIterDataset(it, length_struct=lengths)
    else:
        it = it.map(lambda f: (_check_fits(len(f["inputs"]), seq_len), f)[1])
        # First-fit into `rows` bins: documents stay whole, padding fills the rest.
        packed = grain_exp.FirstFitPackIterDataset(it, length_struct=lengths,
                                                   num_packing_bins=rows, shuffle_bins=False)
    return packed.map(_rename_packed)


def examples_per_row(cfg: Config, split: str = "train") -> int:
    """How many examples a row holds under slot packing (1 for other packings)."""
    if resolve_packing(cfg.data) != "slots":
        return 1
    if cfg.data.examples_per_row:
        return cfg.data.examples_per_row
    source, transform = _indexed(cfg, split, tokenizer_for(cfg.data))
    return auto_examples_per_row(source, transform, cfg.train.seq_len)


def steps_per_epoch(cfg: Config, split: str = "train") -> int:
    """Optimizer steps that see every example of a supervised split once (slot packing), e.g.
    for "5 epochs per curriculum stage"."""
    data = cfg.data
    size = len(_indexed(cfg, split, tokenizer_for(data))[0])
    return max(1, size // (cfg.train.batch_size * examples_per_row(cfg, split)))


def make_train_iterator(cfg: Config, *, process_index: int = 0, process_count: int = 1,
                        split: str = "train") -> grain.DatasetIterator:
    """Endless iterator of this process's batches ``[batch_size // process_count, seq_len]``.

    Save ``it.get_state()`` with the checkpoint; ``it.set_state(state)`` on a fresh iterator
    from the same config resumes the exact data order.
    """
    it = iter(make_dataset(cfg, split=split, process_index=process_index,
                           process_count=process_count))
    _LIVE_ITERATORS.add(it)
    return it


# Background prefetch threads are stopped before interpreter shutdown tears down the modules
# they use (otherwise grain prints ignored exceptions at exit).
_LIVE_ITERATORS: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()


@atexit.register
def _close_iterators() -> None:
    for it in list(_LIVE_ITERATORS):
        it.close()
        it.close = lambda: None  # its __del__ at teardown would find grain's modules gone


def make_eval_batches(cfg: Config, *, num_batches: int, split: str = "test",
                      process_index: int = 0, process_count: int = 1,
                      repeat: bool = True) -> list[Batch]:
    """The first ``num_batches`` batches of a held-out split, in a fixed order (no shuffling):
    the same rows for every run and every call, so eval losses are comparable. ``repeat=False``
    reads the split once, returning fewer batches when it is smaller (none: `ConfigError`)."""
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be >= 1.")
    it = iter(make_dataset(cfg, split=split, process_index=process_index,
                           process_count=process_count, shuffle=False, repeat=repeat))
    batches = list(itertools.islice(it, num_batches))
    if not batches:
        raise ConfigError(f"the {split} split holds less than one batch (train.batch_size="
                          f"{cfg.train.batch_size} x train.seq_len={cfg.train.seq_len} tokens); "
                          "hold out more text or evaluate with a smaller train.batch_size.")
    it.close()
    _LIVE_ITERATORS.add(it)  # so that its teardown stays quiet too
    return batches
