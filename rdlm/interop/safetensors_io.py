"""Safetensors files one tensor at a time: scanning headers (single file or an index of shards),
reading a tensor, comparing two tensors block by block, and writing files tensor by tensor, so that
host memory never holds a second copy of a model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype names <-> numpy dtypes (bfloat16 comes from ml_dtypes, a jax dependency).
ST_DTYPES = {"F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
              "BF16": np.dtype(jax.numpy.bfloat16)}
TORCH_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

class TensorInfo(NamedTuple):
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]


def read_json(path: Path, what: str, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{what} {str(path)!r} does not exist.")
    except (OSError, ValueError) as err:
        problems.append(f"{what} {str(path)!r} is not valid JSON: {err}")
    return None


def scan_files(directory: Path, problems: list[str]) -> dict[str, TensorInfo]:
    """Name, dtype and shape of every tensor, from the safetensors headers only."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        index = read_json(index_path, "index", problems)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            if index is not None:
                problems.append(f"{INDEX_FILE} has no \"weight_map\" mapping tensor names to files.")
            return {}
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).exists():
        weight_map, files = None, [SINGLE_FILE]
    else:
        present = sorted(p.name for p in directory.glob("*.safetensors"))
        problems.append(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(directory)!r}"
                        + (f" (found {present})" if present else "") + ".")
        return {}
    tensors: dict[str, TensorInfo] = {}
    for file_name in files:
        file = directory / file_name
        if not file.exists():
            problems.append(f"{INDEX_FILE} lists {file_name!r}, which does not exist.")
            continue
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    info = TensorInfo(file, view.get_dtype(), tuple(view.get_shape()))
                    if name in tensors:
                        problems.append(f"{name} appears in both {tensors[name].file.name} and "
                                        f"{file_name}.")
                    elif weight_map is not None and weight_map.get(name) != file_name:
                        problems.append(f"{name} is in {file_name} but {INDEX_FILE} lists "
                                        f"{weight_map.get(name)!r} for it.")
                    tensors[name] = info
        except Exception as err:  # safetensors raises its own error types for corrupt files
            problems.append(f"{file_name} is not a readable safetensors file: {err}")
    if weight_map is not None:
        for name, file_name in weight_map.items():
            if name not in tensors and (directory / file_name).exists():
                problems.append(f"{INDEX_FILE} lists {name} in {file_name}, which lacks it.")
    return tensors


def same_values(a: TensorInfo, a_name: str, b: TensorInfo, b_name: str,
                 rows: int = 4096) -> bool:
    """Compare two [rows, d] tensors a block of rows at a time (as float32)."""
    with safe_open(a.file, framework="numpy") as fa, safe_open(b.file, framework="numpy") as fb:
        sa, sb = fa.get_slice(a_name), fb.get_slice(b_name)
        for start in range(0, a.shape[0], rows):
            stop = min(start + rows, a.shape[0])
            block_a = np.asarray(sa[start:stop], np.float32)
            if not np.array_equal(block_a, np.asarray(sb[start:stop], np.float32)):
                return False
    return True


def read_tensor(info: TensorInfo, name: str) -> np.ndarray:
    # One open per tensor: the file's pages are unmapped again before the next tensor is read.
    with safe_open(info.file, framework="numpy") as f:
        return f.get_tensor(name)

def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} must be positive.")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r} is invalid: use bytes or e.g. '5GB', '500MB'.")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = int(float(match.group(1)) * units[match.group(2)])
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r} must be positive.")
    return value


class OutTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fetch: Callable[[], np.ndarray]  # produces the array (in `dtype`) when it is written

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _st_name(dtype: np.dtype) -> str:
    return {v: k for k, v in ST_DTYPES.items()}[np.dtype(dtype)]


def write_safetensors(file: Path, tensors: Sequence[OutTensor]) -> None:
    """A safetensors file written tensor by tensor, so only one tensor is ever in host memory."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _st_name(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors:
            array = np.ascontiguousarray(t.fetch(), dtype=t.dtype)
            if array.shape != t.shape:
                raise RuntimeError(f"{t.name}: produced shape {array.shape}, planned {t.shape}.")
            if array.dtype.byteorder == ">":
                array = array.byteswap().view(array.dtype.newbyteorder("<"))
            f.write(array.view(np.uint8).reshape(-1).data)
            del array


def plan_shards(tensors: Sequence[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards
