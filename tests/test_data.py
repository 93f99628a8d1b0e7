"""Grain pipelines: packing, loss masks, sharding, resumable state, token sources, prepare."""

import json

import numpy as np
import pytest

import rdlm
from rdlm.config import ConfigError
from rdlm.data import make_eval_batches, make_train_iterator
from rdlm.data.pipeline import make_dataset, window_to_row
from rdlm.cli.prepare import cli as prepare_cli
from rdlm.data.render import render
from rdlm.data.tasks import example_at, make_task, split_of
from rdlm.data.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

TOK = CharTokenizer()
TOK_ASCII = load_tokenizer("ascii")
KEYS = {"inputs", "targets", "segment_ids", "loss_mask"}


def _cfg(*overrides, batch=4, seq_len=64):
    return rdlm.load_config("configs/tiny.yaml", [f"train.batch_size={batch}",
                                                  f"train.seq_len={seq_len}", *overrides])


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k])
                                                                 for k in x) for x, y in zip(a, b))


def _segments(row):
    """Each packed segment as (tokens incl. the final target, mask per token), in row order."""
    out = []
    for s in [s for s in np.unique(row["segment_ids"]) if s > 0]:
        where = np.flatnonzero(row["segment_ids"] == s)
        assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
        inputs, targets = row["inputs"][where], row["targets"][where]
        assert np.array_equal(inputs[1:], targets[:-1])  # targets are the next token in-segment
        tokens = np.append(inputs, targets[-1])
        out.append((tokens, np.append(0, row["loss_mask"][where])))
    return out


def test_batches_have_the_agreed_shape_and_dtype():
    it = make_train_iterator(_cfg(batch=6, seq_len=48), process_index=1, process_count=2)
    batch = next(it)
    assert set(batch) == KEYS
    for v in batch.values():
        assert v.dtype == np.int32 and v.shape == (3, 48)


@pytest.mark.parametrize("packing", ["slots", "first_fit", "none", "concat"])
def test_packed_rows_keep_examples_apart(packing):
    cfg = _cfg(f"data.packing={packing}", "data.format=cot", "data.num_examples=200")
    task = make_task("chains", 1)
    rendered = {}
    for i in range(200):
        tokens, mask = render(example_at(task, "train", i), TOK, fmt="cot")
        rendered[tuple(tokens)] = mask
    seen = 0
    for batch in _take(make_train_iterator(cfg), 5):
        assert not batch["loss_mask"][batch["segment_ids"] == 0].any()  # nothing on padding
        for row in (dict(zip(batch, r)) for r in zip(*batch.values())):
            for tokens, mask in _segments(row):
                if packing == "concat" and tuple(tokens) not in rendered:
                    continue  # an example split across rows
                assert tuple(tokens) in rendered
                assert np.array_equal(mask[1:], rendered[tuple(tokens)][1:])
                seen += 1
    assert seen >= 10


def test_loss_mask_covers_only_the_answer_by_default():
    batch = next(make_train_iterator(_cfg()))
    answers = batch["targets"][batch["loss_mask"] == 1]
    text = TOK.decode(answers)
    assert set(text) <= set("#0123456789") | {"<", "e", "o", "s", ">"}
    assert text.count("#") == text.count("<eos>") > 0


@pytest.mark.parametrize("packing", ["slots", "first_fit"])
def test_packing_puts_several_examples_in_a_row(packing):
    batch = next(make_train_iterator(_cfg(f"data.packing={packing}", batch=8, seq_len=64)))
    assert batch["segment_ids"].max() >= 2
    assert (batch["segment_ids"] > 0).mean() > 0.6


def test_slots_fit_the_longest_examples():
    batches = _take(make_train_iterator(_cfg(seq_len=64)), 4)
    counts = [len(set(r[r > 0].tolist())) for b in batches for r in b["segment_ids"]]
    assert min(counts) == max(counts) == 2  # level-1 examples have at most 31 tokens
    explicit = next(make_train_iterator(_cfg("data.examples_per_row=3", seq_len=64)))
    assert explicit["segment_ids"].max() <= 3


def test_same_config_same_batches_and_seed_changes_order():
    cfg = _cfg()
    assert _equal(_take(make_train_iterator(cfg), 3), _take(make_train_iterator(cfg), 3))
    other = _take(make_train_iterator(_cfg("data.shuffle_seed=1")), 3)
    assert not _equal(_take(make_train_iterator(cfg), 3), other)


@pytest.mark.parametrize("packing", ["slots", "first_fit", "none"])
def test_state_restore_continues_identically(packing):
    cfg = _cfg(f"data.packing={packing}")
    it = make_train_iterator(cfg)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # survives a round trip through a checkpoint
    expected = _take(it, 4)
    resumed = make_train_iterator(cfg)
    resumed.set_state(state)
    assert _equal(_take(resumed, 4), expected)


@pytest.mark.parametrize("packing", ["slots", "none"])
def test_processes_split_each_global_batch_by_rows(packing):
    cfg = _cfg(f"data.packing={packing}", batch=4)
    single = _take(make_train_iterator(cfg), 3)
    its = [make_train_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    parts = [_take(it, 3) for it in its]
    for b, whole in enumerate(single):  # process p holds rows 2p, 2p + 1 of every global batch
        for k in KEYS:
            assert np.array_equal(np.concatenate([parts[0][b][k], parts[1][b][k]]), whole[k])
    rows = [{r.tobytes() for b in part for r in b["inputs"]} for part in parts]
    assert not rows[0] & rows[1]
    # The state names the global batch: the same on both processes, and valid for one process.
    assert its[0].get_state() == its[1].get_state()
    resumed = make_train_iterator(cfg)
    resumed.set_state(its[0].get_state())
    assert _equal([next(resumed)], [next(make_iter_at(cfg, 3))])


def make_iter_at(cfg, batches):
    it = make_train_iterator(cfg)
    _take(it, batches)
    return it


def test_streaming_packers_shard_examples_by_process():
    cfg = _cfg("data.packing=first_fit", "data.num_examples=64", batch=4)
    seen = [{r.tobytes() for b in _take(make_train_iterator(cfg, process_index=p,
                                                            process_count=2), 2)
             for r in b["inputs"]} for p in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_every_epoch_is_a_fresh_permutation():
    cfg = _cfg("data.packing=none", "data.num_examples=8", batch=4)
    rows = [r.tobytes() for b in _take(make_train_iterator(cfg), 4) for r in b["inputs"]]
    epochs = rows[:8], rows[8:]
    assert len(set(epochs[0])) == 8 and set(epochs[0]) == set(epochs[1])
    assert epochs[0] != epochs[1]


def test_eval_batches_are_fixed_and_held_out():
    cfg = _cfg("data.packing=none")
    batches = make_eval_batches(cfg, num_batches=2)
    assert _equal(batches, make_eval_batches(cfg, num_batches=2))
    for row_inputs, seg in zip(batches[0]["inputs"], batches[0]["segment_ids"]):
        question = TOK.decode(row_inputs[seg > 0]).split("\n")[0].removeprefix("<bos>")
        assert split_of(question) == "test"


def test_pipeline_config_errors():
    with pytest.raises(ConfigError, match="vocab_size"):
        make_train_iterator(_cfg("data.tokenizer=ascii"))
    with pytest.raises(ConfigError, match="max_seq_len"):
        make_train_iterator(_cfg(seq_len=128))
    with pytest.raises(ConfigError, match="divisible"):
        make_train_iterator(_cfg(batch=3), process_count=2)
    with pytest.raises(ValueError, match="seq_len"):
        next(make_train_iterator(_cfg("data.difficulty=5", seq_len=32)))


# ---------------------------------------------------------------------------------------------
# Token sources.


def test_window_rows_start_segments_after_eos():
    eos = TOK.eos_id
    row = window_to_row(np.array([7, 8, eos, 9, 10, eos, 11]), eos)
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2]
    assert row["loss_mask"].tolist() == [1, 1, 0, 1, 1, 0]  # no target crosses a boundary


def _docs(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(6, 60, size=rng.integers(3, 30)).astype(np.int32) for _ in range(n)]


def test_memmap_source_round_trip(tmp_path):
    docs = _docs()
    stream = np.concatenate([np.append(d, TOK.eos_id) for d in docs]).astype(np.uint16)
    np.save(tmp_path / "train-0.npy", stream[:300])
    stream[300:].tofile(tmp_path / "train-1.bin")  # no dtype sidecar: uint16 is the default
    cfg = _cfg("data.source=memmap", f"data.paths=[{tmp_path}/train-*]", "data.shuffle=false",
               batch=2, seq_len=16)
    rows = [dict(zip(b, r)) for b in _take(make_train_iterator(cfg), 9) for r in zip(*b.values())]
    windows = [np.append(r["inputs"], r["targets"][-1]) for r in rows[:18]]
    assert np.array_equal(np.concatenate([w[:-1] for w in windows]), stream[:288])
    for r in rows:
        assert not r["loss_mask"][r["inputs"] == TOK.eos_id].any()


def _prepare(tmp_path, fmt, tokenizer):
    corpus = tmp_path / "corpus.jsonl"
    texts = [f"document {i}: " + "abc def ghi "[: 3 + i % 9] * (1 + i % 4) for i in range(30)]
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    out = tmp_path / fmt
    assert prepare_cli([str(corpus), "--tokenizer", tokenizer, "--output", str(out),
                        "--format", fmt, "--shard-tokens", "200", "--prefix", "train"]) == 0
    meta = json.loads((out / "train.meta.json").read_text())
    assert meta["documents"] == 30 and len(meta["files"]) > 1
    return texts, out, meta


def _tiny_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["<|end_text|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["document abc def ghi 0123456789:"] * 20, trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize("fmt,source", [("npy", "memmap"), ("bin", "memmap"),
                                        ("arrayrecord", "arrayrecord"), ("parquet", "parquet")])
def test_prepare_end_to_end_with_a_tokenizer_json(tmp_path, fmt, source):
    tokenizer = _tiny_tokenizer_json(tmp_path)
    hf = HFTokenizer(tokenizer)
    texts, out, meta = _prepare(tmp_path, fmt, tokenizer)
    pattern = f"{out}/train-*"
    cfg = _cfg(f"data.source={source}", f"data.paths=[{pattern}]", f"data.tokenizer={tokenizer}",
               "data.shuffle=false", "data.packing=none", f"model.vocab_size={hf.vocab_size}",
               batch=2, seq_len=64)
    batch = next(make_train_iterator(cfg))
    first = batch["inputs"][0][batch["segment_ids"][0] == 1]
    if source == "memmap":  # a flat stream: the EOS is the segment's last input
        assert first[-1] == hf.eos_id
        first = first[:-1]
    else:  # a packed document: the EOS is its last target
        assert batch["targets"][0][batch["segment_ids"][0] == 1][-1] == hf.eos_id
    assert hf.decode(first) == texts[0]  # the documents come back in order, EOS-separated
    if source != "memmap":
        row = dict(zip(batch, [v[1] for v in batch.values()]))
        assert hf.decode(row["inputs"][row["segment_ids"] == 1]) == texts[1]


def test_record_sources_pack_documents(tmp_path):
    _, out, _ = _prepare(tmp_path, "arrayrecord", "chars")
    cfg = _cfg("data.source=arrayrecord", f"data.paths=[{out}/train-*]", "data.loss_on=all",
               batch=2, seq_len=64)
    batch = next(make_train_iterator(cfg))
    assert batch["segment_ids"].max() >= 2
    for row in (dict(zip(batch, r)) for r in zip(*batch.values())):
        for tokens, _ in _segments(row):
            assert tokens[-1] == TOK.eos_id and (tokens[:-1] != TOK.eos_id).all()


def test_gsm8k_source_through_the_pipeline(tmp_path):
    lines = [f"Sam has {i} pens and gets {i + 1} more. How many?||<<{i}+{i + 1}={2 * i + 1}>> "
             f"#### {2 * i + 1}" for i in range(20)]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    cfg = _cfg("data.source=gsm8k", f"data.paths=['{tmp_path}/{{split}}.txt']", "data.format=cot",
               "data.tokenizer=ascii", "model.vocab_size=128", "model.max_seq_len=128", batch=2,
               seq_len=128)
    batch = next(make_train_iterator(cfg))
    text = TOK_ASCII.decode(batch["targets"][0][batch["loss_mask"][0] == 1])
    assert text.count("#") >= 1 and "=" in text and "Sam" not in text



def test_steps_per_epoch_counts_slot_packed_examples():
    from rdlm.data import examples_per_row, steps_per_epoch
    cfg = _cfg("data.num_examples=1000", batch=4, seq_len=64)
    assert examples_per_row(cfg) == 2
    assert steps_per_epoch(cfg) == 1000 // (4 * 2)
