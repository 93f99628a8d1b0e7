"""Random-access data sources (index → record), the first stage of every grain pipeline.

- `TaskSource`: a synthetic task's split, index → `Example` (generated on demand, never stored);
- `ExampleListSource`: examples held in memory (e.g. a GSM8k-Aug file);
- `TokenWindowSource`: flat token streams in ``.npy`` / ``.bin`` files (numpy memmap), documents
  separated by EOS, cut into fixed windows of ``seq_len + 1`` tokens;
- `ArrayRecordDocSource`, `ParquetDocSource`: one document (a token-id sequence) per record/row.

All are deterministic functions of the index, so shuffling, sharding and resuming are done on
indices by grain and cost nothing here.
"""

from __future__ import annotations

import bisect
import io
import json
from typing import Sequence

import grain
import numpy as np

from rdlm.errors import ConfigError
from rdlm.runtime import storage
from rdlm.data.tasks import Example, Task, check_split, example_at


class TaskSource:
    """``size`` examples of one split of a synthetic task (grain RandomAccessDataSource)."""

    def __init__(self, task: Task, split: str, size: int, seed: int = 0):
        check_split(split)
        self.task, self.split, self.size, self.seed = task, split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return example_at(self.task, self.split, int(index), self.seed)

    def __repr__(self) -> str:
        return f"TaskSource({self.task.name}, {self.task.params}, split={self.split!r})"


class ExampleListSource:
    """Examples already in memory."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def expand_paths(patterns: Sequence[str], split: str) -> list[str]:
    """Files matching ``patterns`` (``{split}`` replaced by the split), sorted: a stable order.
    Patterns may name a bucket (``gs://…``, ``s3://…``)."""
    files: list[str] = []
    for pattern in patterns:
        pattern = pattern.replace("{split}", split)
        storage.check_access(pattern, "data.paths")
        matched = storage.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
        files += [f for f in matched if storage.as_path(f).is_file()]
    if not files:
        raise ConfigError(f"data.paths={tuple(patterns)!r} matched no files for split {split!r}.")
    return files


# ---------------------------------------------------------------------------------------------
# Flat token streams (numpy memmap).

BIN_DTYPE_SUFFIX = ".json"  # a `.bin` file's dtype is in `<file>.json` ({"dtype": "uint16"})


class RemoteTokens:
    """A 1-D token array in a bucket: each slice is one ranged read, so a worker fetches only
    the windows it serves (the counterpart of a memmap, which object stores do not offer)."""

    def __init__(self, path: str, dtype: np.dtype, offset: int, length: int):
        self.path, self.dtype, self.offset, self.length = path, np.dtype(dtype), offset, length
        self.ndim = 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, window: slice) -> np.ndarray:
        start, stop, _ = window.indices(self.length)
        size = self.dtype.itemsize
        data = storage.read_range(storage.as_path(self.path), self.offset + start * size,
                                  self.offset + max(start, stop) * size)
        return np.frombuffer(data, self.dtype)


_NPY_HEADER_BYTES = 1 << 16  # a .npy header is far shorter than this


def _remote_token_file(path: str, dtype: str) -> RemoteTokens:
    file = storage.as_path(path)
    total = storage.size(file)
    if not path.endswith(".npy"):
        return RemoteTokens(path, np.dtype(dtype), 0, total // np.dtype(dtype).itemsize)
    head = io.BytesIO(storage.read_range(file, 0, min(total, _NPY_HEADER_BYTES)))
    version = np.lib.format.read_magic(head)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, npy_dtype = read_header(head)
    if len(shape) != 1:
        raise ValueError(f"token file {path!r} must hold a 1-D integer array, got shape "
                         f"{list(shape)}.")
    return RemoteTokens(path, npy_dtype, head.tell(), shape[0])


def open_token_file(path: str) -> np.ndarray | RemoteTokens:
    """A 1-D token array backed by the file (nothing is read until indexed)."""
    meta_path = storage.as_path(path + BIN_DTYPE_SUFFIX)
    dtype = "uint16"
    if not path.endswith(".npy") and meta_path.is_file():
        dtype = json.loads(meta_path.read_text())["dtype"]
    if storage.is_remote(path):
        array = _remote_token_file(path, dtype)
    elif path.endswith(".npy"):
        array = np.load(path, mmap_mode="r")
    else:
        array = np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"token file {path!r} must hold a 1-D integer array, got "
                         f"{array.dtype}{list(array.shape)}.")
    return array


class TokenWindowSource:
    """Consecutive windows of ``seq_len + 1`` tokens over each file (overlapping by one token, so
    every token is a target exactly once). Windows never span two files."""

    def __init__(self, paths: Sequence[str], seq_len: int):
        self.arrays = [open_token_file(p) for p in paths]
        self.seq_len = seq_len
        counts = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
        if self.starts[-1] == 0:
            raise ValueError(f"token files {list(paths)} hold fewer than seq_len + 1 = "
                             f"{seq_len + 1} tokens.")

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        f = bisect.bisect_right(self.starts, index) - 1
        offset = (index - self.starts[f]) * self.seq_len
        return np.asarray(self.arrays[f][offset:offset + self.seq_len + 1], np.int32)


# ---------------------------------------------------------------------------------------------
# One document per record.


class ArrayRecordDocSource:
    """ArrayRecord files whose records are little-endian int32 token ids (`encode_doc`)."""

    def __init__(self, paths: Sequence[str]):
        remote = [p for p in paths if storage.is_remote(p)]
        if remote:
            raise ConfigError(f"data.paths: ArrayRecord files are read from local disk only "
                              f"({remote[0]!r} is in a bucket); copy them to each host, or "
                              "store the tokens as .npy/.bin or parquet, which rdlm reads from "
                              "buckets.")
        self._source = grain.sources.ArrayRecordDataSource(list(paths))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_doc(self._source[index])


def encode_doc(tokens: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(tokens, "<i4").tobytes()


def decode_doc(record: bytes) -> np.ndarray:
    return np.frombuffer(record, "<i4").astype(np.int32)


class ParquetDocSource:
    """Parquet files with a list-of-integers column (``token_column``), one document per row, as
    in the Huginn training data. The column is memory-mapped, not copied."""

    def __init__(self, paths: Sequence[str], token_column: str = "tokens"):
        # deferred: only parquet sources need pyarrow, which takes a few hundred ms to load
        import pyarrow.parquet as pq
        self.columns = []
        for path in paths:
            # a bucket's file is read whole into memory: object stores cannot be memory-mapped
            table = (pq.read_table(storage.as_path(path).open("rb"))
                     if storage.is_remote(path) else
                     pq.read_table(path, columns=None, memory_map=True))
            if token_column not in table.column_names:
                raise ConfigError(f"data.token_column={token_column!r} is not a column of "
                                  f"{path!r}; columns: {table.column_names}.")
            self.columns.append(table.column(token_column))
        self.starts = np.concatenate([[0], np.cumsum([len(c) for c in self.columns])]).tolist()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        f = bisect.bisect_right(self.starts, index) - 1
        row = self.columns[f][index - self.starts[f]]
        return np.asarray(row.values.to_numpy(zero_copy_only=False), np.int32)
