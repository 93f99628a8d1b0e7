"""``python -m rdlm prepare``: tokenize text / JSONL into training shards.

    python -m rdlm prepare --tokenizer tokenizer.json --output data/ --prefix train \\
        --format npy corpus/*.jsonl

Each document is encoded with the tokenizer, after its BOS token when it has one (generation
puts the same BOS in front of a prompt) and followed by its EOS token (the separator the
pipeline uses to start a new segment). Formats: ``npy`` / ``bin`` (flat token stream, read with
``data.source=memmap``), ``arrayrecord`` and ``parquet`` (one document per record / row, column
``tokens``). A ``<prefix>.meta.json`` records the tokenizer, vocabulary size, EOS id and counts.

``--output`` may be a bucket (``gs://…``, ``s3://…``): the files are written into a local
temporary folder and uploaded once all are done, the meta files last, so a bucket holds a
split's meta file only when every one of its shards is there.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from rdlm.data.sources import BIN_DTYPE_SUFFIX, encode_doc
from rdlm.data.tokenizer import RUN_TOKENIZER, Tokenizer, load_tokenizer, train_bpe_tokenizer
from rdlm.errors import ConfigError
from rdlm.runtime import storage

FORMATS = ("npy", "bin", "arrayrecord", "parquet")
META_SUFFIX = ".meta.json"  # <prefix>.meta.json: written last, it marks a split complete


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise ValueError(f"input file {str(path)!r} is not UTF-8 text (line {line}, byte "
                         f"{err.start}: {err.reason}); convert it first, e.g. "
                         "`iconv -f latin1 -t utf-8`.") from None


def _json_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for a JSON array file or a JSON-lines file; ``where`` names file and
    line (or array index) for the error messages."""
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg}).") from None
        yield from ((f"{path}: record {i}", r) for i, r in enumerate(records))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); "
                             "a .jsonl file holds one JSON object per line.") from None


def read_documents(path: str | Path, *, text_key: str = "text",
                   txt_documents: str = "paragraph") -> Iterator[str]:
    """Documents of a ``.jsonl``/``.json`` file (field ``text_key``) or a text file (one per
    paragraph, per line or the whole file). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {str(path)!r} does not exist.")
    text = _read_text(path)
    if path.suffix in (".jsonl", ".json"):
        for where, record in _json_records(path, text):
            if not isinstance(record, dict) or text_key not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise KeyError(f"{where}: no {text_key!r} field (found: {fields}); set "
                               "--text-key to the field that holds the text.")
            yield str(record[text_key])
        return
    if txt_documents == "file":
        parts = [text]
    elif txt_documents == "line":
        parts = text.splitlines()
    else:
        parts = text.split("\n\n")
    yield from (p.strip() for p in parts if p.strip())


def tokenize_documents(docs: Iterable[str], tok: Tokenizer) -> Iterator[np.ndarray]:
    """Each document as `Tokenizer.prompt` encodes a prompt (after the BOS when the tokenizer has
    one, so that generation starts where training did), followed by the end-of-text id, the
    separator the pipeline splits on."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    eos = tok.require("eos", "separating documents in prepared shards")
    for doc in docs:
        yield np.asarray(tok.prompt(doc) + [eos], dtype)


def write_shards(docs: Iterable[np.ndarray], output: Path, prefix: str, fmt: str,
                 shard_tokens: int) -> list[str]:
    """Write documents into shards of about ``shard_tokens`` tokens; returns the file names."""
    output.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    buffer: list[np.ndarray] = []
    size = 0

    def flush() -> None:
        nonlocal buffer, size
        if not buffer:
            return
        name = output / f"{prefix}-{len(files):05d}.{ 'array_record' if fmt == 'arrayrecord' else fmt}"
        _write_one(buffer, name, fmt)
        files.append(name.name)
        buffer, size = [], 0

    for doc in docs:
        buffer.append(doc)
        size += len(doc)
        if size >= shard_tokens:
            flush()
    flush()
    return files


def _write_one(docs: list[np.ndarray], path: Path, fmt: str) -> None:
    # Write to a temporary name and rename, so that a killed run never leaves a half shard.
    tmp = path.with_name(path.name + ".tmp")
    if fmt in ("npy", "bin"):
        stream = np.concatenate(docs)
        if fmt == "npy":
            with open(tmp, "wb") as f:
                np.save(f, stream)
        else:
            stream.tofile(tmp)
            Path(str(path) + BIN_DTYPE_SUFFIX).write_text(json.dumps({"dtype": str(stream.dtype)}))
    elif fmt == "arrayrecord":
        # deferred, like pyarrow below: only this output format needs the library
        from array_record.python.array_record_module import ArrayRecordWriter
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for doc in docs:
            writer.write(encode_doc(doc))
        writer.close()
    elif fmt == "parquet":
        # deferred: only parquet output needs pyarrow, which takes a few hundred ms to load
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.table({"tokens": pa.array([d.astype(np.int32) for d in docs],
                                             type=pa.list_(pa.int32()))})
        pq.write_table(table, tmp)
    else:
        raise ValueError(f"format {fmt!r} must be one of {FORMATS}.")
    tmp.rename(path)


def held_out(doc: str, fraction: float) -> bool:
    """Whether ``doc`` goes to the test split: by a hash of its text, so the split stays the
    same when files are reordered or more are added."""
    return zlib.crc32(doc.encode("utf-8")) % 1_000_000 < fraction * 1_000_000


def resolve_tokenizer(spec: str, train_docs: Callable[[], Iterable[str]], output: Path,
                      final: storage.StoragePath | None = None) -> tuple[Tokenizer, str]:
    """(tokenizer, where it is): ``bpe:N`` trains an N-token byte-level BPE on ``train_docs()``
    into ``<output>/tokenizer.json``, named by where that folder's files end up (``final``, e.g.
    the bucket ``output`` is staged for; default ``output``); anything else is loaded
    (`load_tokenizer`)."""
    if not spec.startswith("bpe:"):
        return load_tokenizer(spec), spec
    try:
        vocab_size = int(spec.removeprefix("bpe:"))
    except ValueError:
        raise ConfigError(f"--tokenizer {spec!r}: expected bpe:VOCAB_SIZE, e.g. bpe:2048.") from None
    tok = train_bpe_tokenizer(train_docs(), vocab_size, output / RUN_TOKENIZER)
    return tok, str((output if final is None else final) / RUN_TOKENIZER)


def prepare(inputs: Sequence[str], *, tokenizer: str, output: str, prefix: str = "train",
            fmt: str = "npy", shard_tokens: int = 50_000_000, text_key: str = "text",
            txt_documents: str = "paragraph", test_fraction: float = 0.0) -> dict:
    """Tokenize ``inputs`` into shards under ``output``; returns (and writes) the metadata.

    ``tokenizer="bpe:N"`` first trains a tokenizer on the (training) documents and saves it as
    ``<output>/tokenizer.json``. ``test_fraction > 0`` sends that share of the documents (by a
    hash of each) to shards named ``test-*`` and the rest to ``train-*``, so that
    ``data.paths: [<output>/{split}-*.npy]`` trains on one and evaluates on the other.
    ``output`` may be a bucket URL (see the module's doc)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is invalid: must be one of {FORMATS}.")
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"--test-fraction={test_fraction} must be in [0, 1).")
    storage.check_access(output, "--output")  # before any input is read: one clear error
    out = storage.as_given(output)
    read = lambda: (d for path in inputs for d in read_documents(  # noqa: E731
        path, text_key=text_key, txt_documents=txt_documents))
    splits = {"train" if test_fraction else prefix: False}
    if test_fraction:
        splits["test"] = True
    # An error below leaves the bucket untouched: the staged files are uploaded only at the end.
    with storage.staged(out, last=(f"*{META_SUFFIX}",)) as folder:
        tok, tokenizer = resolve_tokenizer(
            tokenizer, lambda: (d for d in read() if not held_out(d, test_fraction)), folder, out)
        meta: dict[str, Any] = {}
        for name, is_test in splits.items():
            docs = (d for d in read() if not test_fraction or held_out(d, test_fraction) == is_test)
            meta[name] = _write_split(tokenizer, tok, docs, folder, name, fmt, shard_tokens)
        total = sum(m["documents"] for m in meta.values())
        if not total:
            raise ValueError(f"no documents in {', '.join(map(repr, inputs))}: the input is empty "
                             "or only whitespace (a .txt file splits into documents at blank "
                             "lines; see --txt-documents).")
        if test_fraction and not meta["test"]["documents"]:
            raise ValueError(f"--test-fraction={test_fraction} held out none of the {total} "
                             "documents: raise it, or split the text into more documents.")
    return meta[prefix] if not test_fraction else meta


def _write_split(tokenizer: str, tok: Tokenizer, docs: Iterable[str], out: Path, prefix: str,
                 fmt: str, shard_tokens: int) -> dict[str, Any]:
    counts = {"documents": 0, "tokens": 0}

    def counted() -> Iterator[np.ndarray]:
        for doc in tokenize_documents(docs, tok):
            counts["documents"] += 1
            counts["tokens"] += len(doc)
            yield doc

    files = write_shards(counted(), out, prefix, fmt, shard_tokens)
    meta = {"tokenizer": tokenizer, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "format": fmt, "files": files, **counts}
    if files:
        (out / f"{prefix}{META_SUFFIX}").write_text(json.dumps(meta, indent=2))
    return meta
